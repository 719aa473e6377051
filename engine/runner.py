"""The generation loop: build the per-layer KV policies, prefill, then decode token by token,
handing each new token to a callback (streaming) and timing both phases honestly."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.graphs import GraphedDecoder, can_graph
from engine.kv import build_policies
from engine.kv.base import KVPolicy
from engine.model import Llama
from engine.sampling import SamplingParams, make_generator, sample


@dataclass
class GenerationResult:
    prompt_tokens: int
    generated_ids: list[int]
    prefill_s: float
    decode_times_s: list[float] = field(default_factory=list)  # one per decode step
    stop_reason: str = "length"  # "eos" | "length"
    policies: list[KVPolicy] = field(default_factory=list, repr=False)
    cuda_graphs: bool = False  # decode steps replayed from a CUDA graph

    @property
    def decode_ms_per_token(self) -> float:
        """Median decode step time (robust to a stray slow step on a shared machine); 0 if none."""
        return 1000 * statistics.median(self.decode_times_s) if self.decode_times_s else 0.0

    def kv_bytes(self) -> dict[str, int]:
        total = {"device": 0, "host": 0}
        for p in self.policies:
            for tier, n in p.nbytes().items():
                total[tier] += n
        return total


def _sync(device: torch.device) -> None:  # GPU work is asynchronous: wait before reading a clock
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_prompt(ids: list[int], limit: int) -> tuple[list[int], int]:
    """Cut the middle of a prompt longer than `limit` tokens (the start holds the instructions and
    the end holds the question, so both are kept). Returns (ids, number of tokens cut)."""
    if len(ids) <= limit:
        return ids, 0
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head):], len(ids) - limit


def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams,
             policy_specs: list[dict] | dict, eos_ids: set[int] = frozenset(),
             on_token: Callable[[int], None] | None = None,
             on_layer: Callable[[int], None] | None = None, prefill_chunk: int = 2048,
             cuda_graphs: bool = True) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt_ids` (batch of one). `on_token(id)` is called
    as each token is chosen; `on_layer` reports prefill progress, one call per layer. On CUDA,
    decode steps replay a CUDA graph when every policy allows it (engine.graphs) and cuda_graphs."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    device, dtype = model.head.device, model.head.dtype
    capacity = len(prompt_ids) + max_new_tokens
    policies = build_policies(model.args, policy_specs, capacity, device, dtype)
    gen = make_generator(sampling, device)
    tokens = torch.tensor([prompt_ids], device=device)

    _sync(device)
    t0 = time.perf_counter()
    logits = model.prefill(tokens, policies, chunk=prefill_chunk, progress=on_layer)
    _sync(device)
    result = GenerationResult(len(prompt_ids), [], time.perf_counter() - t0, policies=policies)
    if max_new_tokens == 0:
        return result

    graphed = GraphedDecoder(model, policies, device) if cuda_graphs and can_graph(policies, device) else None
    result.cuda_graphs = graphed is not None
    pos = len(prompt_ids)
    token = sample(logits, sampling, gen)  # (1,)
    tid = int(token.item())
    while True:
        result.generated_ids.append(tid)
        if on_token is not None:
            on_token(tid)
        if tid in eos_ids:
            result.stop_reason = "eos"
            break
        if len(result.generated_ids) >= max_new_tokens:
            break
        # A decode step's time covers the forward pass and sampling up to the id on the host
        # (.item() waits for the device), i.e. what a user waits per token minus printing.
        t = time.perf_counter()
        logits = graphed.step(token, pos) if graphed else model.decode_step(token, pos, policies)
        token = sample(logits, sampling, gen)
        tid = int(token.item())
        result.decode_times_s.append(time.perf_counter() - t)
        pos += 1
    return result
