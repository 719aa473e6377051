"""The decode step the runner calls: the policies' host-side hooks, then the model's step, run
eagerly or replayed from a CUDA graph.

Why graphs: an eager decode step of an 8B model launches ~1,200 small kernels; on an H100 launching
them takes longer than running them (measured: ~27 ms per step at 1k context, almost all of it host
time). A CUDA graph records the step's kernels once and replays them with one launch.

What a graph needs: fixed shapes and addresses, and no host decisions inside the step. So the token
and its position live in static device tensors overwritten before each step, every policy attends
with the position as a device tensor (kernels read the live length on the device), and whatever
needs the host (counters, capacity checks, QuantKV's key-block flush) runs in the policies'
before_step() hooks, between replays:  hooks, replay, hooks, replay, ...
The eager path is the same code without the capture.

Step 1 runs eagerly on a side stream (compiles Triton kernels, creates cuBLAS handles: capture
allows neither, and a policy may set up state on its first step, e.g. OffloadKV's first selection),
step 2 is captured, and every step from then on is a replay.
"""
from __future__ import annotations

import torch

from engine.kv.base import KVPolicy
from engine.model import Llama
from kernels.dense_attn import runs_triton


def device_kernels(head_dim: int, device: torch.device) -> bool:
    """Whether decode attention and OffloadKV's fetch run as Triton kernels here, which a graph
    needs: their torch references read the live length or the wanted rows on the host (a sync,
    which capture forbids). The kernels take a head_dim that is a power of two >= 16, and
    LAYERKV_KERNELS=torch turns them off."""
    return runs_triton(torch.empty(0, device=device), head_dim)


class Decoder:
    """Steps one sequence (`policies`: its per-layer policies) or a batch (`policies`: one such list
    per sequence). A graph is captured for one batch: when the batch changes (a sequence finished),
    the runner builds a new Decoder for the sequences left."""

    def __init__(self, model: Llama, policies: list[KVPolicy] | list[list[KVPolicy]], cuda_graphs: bool = True):
        device = model.head.device
        self.seqs = [policies] if policies and isinstance(policies[0], KVPolicy) else policies
        self.model = model
        self.graphed = (cuda_graphs and device.type == "cuda" and device_kernels(model.args.head_dim, device)
                        and all(p.graphable for s in self.seqs for p in s))
        self.token = torch.zeros(len(self.seqs), dtype=torch.long, device=device)  # (B,)
        self.pos = torch.zeros(len(self.seqs), dtype=torch.long, device=device)  # (B,)
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer

    @property
    def settling(self) -> bool:
        """True when the last step was not a steady one: a Decoder's first (eager warm-up; the very
        first also compiles kernels) or, graphed, its second (the capture)."""
        return self.steps == 1 or (self.graphed and self.steps == 2)

    @torch.inference_mode()
    def step(self, token: torch.Tensor, pos: int | list[int]) -> torch.Tensor:
        """token (B,) at positions pos (one int per sequence; an int for one sequence) -> logits
        (B, vocab). Returns the graph's output buffer when graphed: read it (or clone it) before
        the next step."""
        for seq in self.seqs:
            for p in seq:
                p.before_step()
        self.token.copy_(token.reshape(-1))
        self.pos.copy_(torch.tensor([pos] if isinstance(pos, int) else pos))
        self.steps += 1
        if not self.graphed:
            return self.model.decode_step(self.token, self.pos, self.seqs)
        if self.steps == 1:  # warm-up, eager, on a side stream as capture requires
            side, main = torch.cuda.Stream(), torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                logits = self.model.decode_step(self.token, self.pos, self.seqs)
            main.wait_stream(side)
            return logits
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records only: nothing runs until replay()
                self.logits = self.model.decode_step(self.token, self.pos, self.seqs)
        self.graph.replay()
        return self.logits
