"""The generation loop: build the per-layer KV policies, prefill, then decode token by token,
yielding each token as it is chosen (streaming) and timing both phases honestly."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from engine.graphs import Decoder
from engine.kv import build_policies
from engine.kv.base import KVPolicy
from engine.model import Llama
from engine.sampling import SamplingParams, make_generator, sample


@dataclass
class GenerationResult:
    prompt_tokens: int
    generated_ids: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
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


def stream_tokens(model: Llama, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams,
                  policy_specs: list[dict] | dict, result: GenerationResult, eos_ids: set[int] = frozenset(),
                  on_layer: Callable[[int], None] | None = None, prefill_chunk: int = 2048,
                  cuda_graphs: bool = True) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids after `prompt_ids` (batch of one), filling `result`
    (times, stop reason, the policies) as it goes. `on_layer` reports prefill progress, one call
    per layer. On CUDA, decode steps replay a CUDA graph (engine.graphs) unless cuda_graphs=False."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    device, dtype = model.head.device, model.head.dtype
    policies = build_policies(model.args, policy_specs, len(prompt_ids) + max_new_tokens, device, dtype)
    result.policies = policies
    gen = make_generator(sampling, device)
    tokens = torch.tensor([prompt_ids], device=device)

    _sync(device)
    t0 = time.perf_counter()
    logits = model.prefill(tokens, policies, chunk=prefill_chunk, progress=on_layer)
    _sync(device)
    result.prefill_s = time.perf_counter() - t0
    if max_new_tokens == 0:
        return

    decoder = Decoder(model, policies, cuda_graphs)
    result.cuda_graphs = decoder.graphed
    pos = len(prompt_ids)
    token = sample(logits, sampling, gen)  # (1,)
    tid = int(token.item())
    while True:
        result.generated_ids.append(tid)
        yield tid
        if tid in eos_ids:
            result.stop_reason = "eos"
            return
        if len(result.generated_ids) >= max_new_tokens:
            return
        # A decode step's time covers the forward pass and sampling up to the id on the host
        # (.item() waits for the device), i.e. what a user waits per token minus printing.
        t = time.perf_counter()
        token = sample(decoder.step(token, pos), sampling, gen)
        tid = int(token.item())
        result.decode_times_s.append(time.perf_counter() - t)
        pos += 1


def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams,
             policy_specs: list[dict] | dict, eos_ids: set[int] = frozenset(), **kwargs) -> GenerationResult:
    """stream_tokens run to the end: the finished GenerationResult."""
    result = GenerationResult(len(prompt_ids))
    for _ in stream_tokens(model, prompt_ids, max_new_tokens, sampling, policy_specs, result, eos_ids, **kwargs):
        pass
    return result
