"""The generation loop: build the per-layer KV policies, prefill, then decode token by token,
yielding each token as it is chosen (streaming) and timing both phases honestly. One loop serves a
single prompt and a batch of prompts of different lengths (a single prompt is a batch of one)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from numbers import Integral
from typing import Callable, Iterator

import torch

from engine.config import ModelArgs
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
    settling: list[bool] = field(default_factory=list)  # per step: a warm-up or capture step (Decoder.settling)
    stop_reason: str = "length"  # "eos" | "length"
    policies: list[KVPolicy] = field(default_factory=list, repr=False)
    cuda_graphs: bool = False  # decode steps replayed from a CUDA graph

    @property
    def decode_ms_per_token(self) -> float:
        """Median steady decode step time (robust to a stray slow step on a shared machine); 0 if
        none. Warm-up and capture steps are left out: a batch whose sequences end at staggered
        steps takes two more of them after each end (a new Decoder), and a sequence late in such a
        batch could otherwise have as many of them as steady steps."""
        steady = [t for t, s in zip(self.decode_times_s, self.settling) if not s] or self.decode_times_s
        return 1000 * statistics.median(steady) if steady else 0.0

    def kv_bytes(self) -> dict[str, int]:
        total = {"device": 0, "host": 0}
        for p in self.policies:
            for tier, n in p.nbytes().items():
                total[tier] += n
        return total


def sync(device: torch.device) -> None:  # GPU work is asynchronous: wait before reading a clock
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_room(args: ModelArgs, name: str, max_new_tokens: int, ctx: int | None = None) -> int:
    """The most prompt tokens that fit `ctx` and the model's context with max_new_tokens after them."""
    if ctx is not None and not (isinstance(ctx, Integral) and not isinstance(ctx, bool) and ctx >= 1):
        raise ValueError(f"ctx must be an int >= 1 (tokens), got {ctx!r}")
    limit = min(args.max_seq_len if ctx is None else ctx, args.max_seq_len - max_new_tokens)
    if limit <= 0:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in {name}'s "
                         f"{args.max_seq_len}-token context")
    return limit


def encode_prompt(tokenizer, vocab_size: int, prompt: str | list[int], chat: bool = False,
                  allow_special: bool = False) -> list[int]:
    """Text (wrapped in the chat template if chat) or token ids -> token ids, checked. Text a user
    wrote stays text: "<|im_end|>" in it is not a control token unless allow_special (raw prompts
    only; in a chat the template alone writes control tokens)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt")
        if chat:  # the template writes its own special tokens, BOS included
            return tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return tokenizer.encode(prompt, allow_special=allow_special)
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"a prompt is text or a list of token ids, not {type(prompt).__name__}")
    if not prompt:
        raise ValueError("empty prompt")
    if not all(isinstance(t, Integral) and not isinstance(t, bool) and 0 <= t < vocab_size for t in prompt):
        raise ValueError(f"token ids must be ints in [0, {vocab_size})")
    return [int(t) for t in prompt]  # numpy or torch ints become Python ints


def fit_prompt(ids: list[int], limit: int) -> tuple[list[int], int]:
    """Cut the middle of a prompt longer than `limit` tokens (the start holds the instructions and
    the end holds the question, so both are kept). Returns (ids, number of tokens cut)."""
    if len(ids) <= limit:
        return ids, 0
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head):], len(ids) - limit


def stream_tokens(model: Llama, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams,
                  policy_specs: list[dict] | dict, result: GenerationResult, eos_ids: set[int] = frozenset(),
                  **options) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids after `prompt_ids`, filling `result` (times, stop
    reason, the policies) as it goes: stream_batch for a batch of one."""
    for _, tid in stream_batch(model, [prompt_ids], [max_new_tokens], sampling, [policy_specs], [result],
                               eos_ids, **options):
        yield tid


def stream_batch(model: Llama, prompts: list[list[int]], max_new_tokens: list[int], sampling: SamplingParams,
                 specs: list[list[dict] | dict], results: list[GenerationResult], eos_ids: set[int] = frozenset(),
                 on_layer: Callable[[int], None] | None = None, prefill_chunk: int = 2048,
                 cuda_graphs: bool = True) -> Iterator[tuple[int, int]]:
    """Generate for several prompts together; yield (index, token id) as tokens are chosen.

    Each sequence gets its own per-layer policies (specs[b], its own plan if hybrid), sized for its
    own prompt + max_new_tokens[b]: ragged lengths need no padding anywhere. Prefill runs one
    sequence at a time, layer-major (model.prefill), so only one layer's full K/V of one sequence
    exists at once; decode steps run all unfinished sequences together (model.decode_step), reading
    the weights once per step for the whole batch. A sequence that ends (EOS or its own limit)
    leaves the batch and the rest go on: the batch shrinks rather than carrying an idle slot (an
    idle slot would still attend and still need cache room past its limit). On CUDA a shrunken
    batch gets a new Decoder, i.e. one more graph capture; there are at most B of them.

    `on_layer` reports prefill progress (one call per layer per sequence). Each result's
    decode_times_s holds the steps it took part in (a batched step's time is every member's latency)."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("empty prompt")
    device, dtype = model.head.device, model.head.dtype
    seqs = [build_policies(model.args, s, len(p) + n, device, dtype) for p, n, s in zip(prompts, max_new_tokens, specs)]
    gen = make_generator(sampling, device)
    first: dict[int, torch.Tensor] = {}  # each sequence's first new token, (1,) on the device
    for b, (ids, result) in enumerate(zip(prompts, results)):
        result.policies = seqs[b]
        sync(device)
        t0 = time.perf_counter()
        logits = model.prefill(torch.tensor([ids], device=device), seqs[b], chunk=prefill_chunk, progress=on_layer)
        sync(device)
        result.prefill_s = time.perf_counter() - t0
        if max_new_tokens[b] > 0:
            first[b] = sample(logits, sampling, gen)  # (1,)

    def emit(b: int, tid: int) -> bool:
        """Record sequence b's new token; True if b goes on."""
        results[b].generated_ids.append(tid)
        if tid in eos_ids:
            results[b].stop_reason = "eos"
            return False
        return len(results[b].generated_ids) < max_new_tokens[b]

    running = []  # the sequences still decoding, in batch order
    for b in sorted(first):
        tid = int(first[b].item())
        if emit(b, tid):
            running.append(b)
        yield b, tid
    token = torch.cat([first[b] for b in running]) if running else None  # (B,) each running sequence's newest token
    decoder = None
    while running:
        if decoder is None or len(decoder.seqs) != len(running):  # the first step, or a sequence has left
            decoder = Decoder(model, [seqs[b] for b in running], cuda_graphs)
            for b in running:
                results[b].cuda_graphs = decoder.graphed
        # A decode step's time covers the forward pass and sampling up to the ids on the host
        # (.tolist() waits for the device), i.e. what a user waits per token minus printing.
        t = time.perf_counter()
        pos = [len(prompts[b]) + len(results[b].generated_ids) - 1 for b in running]
        out = sample(decoder.step(token, pos), sampling, gen)  # (B,)
        tids = out.tolist()
        dt = time.perf_counter() - t
        keep = []  # batch rows whose sequence goes on
        for j, (b, tid) in enumerate(zip(running, tids)):
            results[b].decode_times_s.append(dt)
            results[b].settling.append(decoder.settling)
            if emit(b, tid):
                keep.append(j)
            yield b, tid
        token = out if len(keep) == len(running) else out[keep]
        running = [running[j] for j in keep]


def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams,
             policy_specs: list[dict] | dict, eos_ids: set[int] = frozenset(), **kwargs) -> GenerationResult:
    """stream_tokens run to the end: the finished GenerationResult."""
    result = GenerationResult(len(prompt_ids))
    for _ in stream_tokens(model, prompt_ids, max_new_tokens, sampling, policy_specs, result, eos_ids, **kwargs):
        pass
    return result
