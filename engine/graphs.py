"""Decode steps replayed from a CUDA graph.

An eager decode step of an 8B model launches ~1,200 small kernels; on an H100 launching them takes
longer than running them (measured: ~27 ms per step at 1k context, almost all of it host time).
A CUDA graph records the step's kernels once and replays them with one launch.

What a graph needs: fixed shapes and addresses, and no host decisions inside the step. So the
token and its position live in static device tensors that are overwritten before each replay;
policies attend through `attend_at(..., pos)` (positions as device tensors, attention length read
on the device by kernels.dense_attn) and update their host-side counters in `advance()` after the
replay. Only policies that declare `graphable` qualify (QuantKV's residual flush and decode-time
eviction are host decisions); otherwise generation stays eager.

Step 1 runs the graphed code eagerly on a side stream (compiles Triton kernels, creates cuBLAS
handles: capture allows neither), step 2 is captured and replayed, every later step is a replay.
"""
from __future__ import annotations

import torch

from engine.kv.base import KVPolicy
from engine.model import Llama


def can_graph(policies: list[KVPolicy], device: torch.device) -> bool:
    return device.type == "cuda" and all(p.graphable for p in policies)


class GraphedDecoder:
    def __init__(self, model: Llama, policies: list[KVPolicy], device: torch.device):
        self.model, self.policies = model, policies
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer
        self.warm = False

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Same contract as Llama.decode_step(token, pos, policies) for a batch of one."""
        self.token.copy_(token.reshape(1))
        self.pos.fill_(pos)
        if not self.warm:
            side, main = torch.cuda.Stream(), torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                logits = self.model.decode_step(self.token, self.pos, self.policies)
            main.wait_stream(side)
            self.warm = True
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):  # records only: nothing runs until replay()
                    self.logits = self.model.decode_step(self.token, self.pos, self.policies)
            self.graph.replay()
            logits = self.logits
        for p in self.policies:
            p.advance()
        return logits
