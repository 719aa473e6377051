"""Quality of a KV policy against FullKV on the same model and text: teacher-forced next-token
distributions (KL, top-1 agreement, perplexity) and pass-key retrieval.

Teacher forcing feeds the *same* continuation tokens to both caches, so the two distributions are
compared position by position; a policy's errors then show up as KL rather than as a diverging
generation that is hard to compare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.haystack import make_haystack
from engine.kv import build_policies
from engine.model import Llama
from engine.runner import generate
from engine.sampling import SamplingParams


@torch.inference_mode()
def teacher_forced_logits(model: Llama, prompt: list[int], continuation: list[int], spec):
    """Logits (N, vocab) predicting each of the N continuation tokens: prefill the prompt under the
    policy `spec`, then decode the continuation one forced token at a time. Returns (logits, policies)."""
    device = model.head.device
    policies = build_policies(model.args, spec, len(prompt) + len(continuation), device, model.head.dtype)
    out = [model.prefill(torch.tensor([prompt], device=device), policies)[0]]
    for i, tok in enumerate(continuation[:-1]):
        out.append(model.decode_step(torch.tensor([tok], device=device), len(prompt) + i, policies)[0])
    return torch.stack(out).float(), policies


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in nats, from logits (N, V)."""
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def top1_agreement(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    return (p_logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item()


def perplexity(logits: torch.Tensor, targets: list[int]) -> float:
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(targets, device=logits.device))
    return math.exp(nll.item())


@dataclass
class Fidelity:
    kl: float          # mean KL(full || policy), nats per token
    top1: float        # fraction of positions where both pick the same next token
    ppl: float         # the policy's perplexity on the continuation
    ppl_full: float    # FullKV's, for reference
    h2d_bytes_per_token: float  # host->device copies per decode step (offloading policies)


def fidelity(model: Llama, prompt: list[int], continuation: list[int], spec,
             full_logits: torch.Tensor | None = None) -> tuple[Fidelity, torch.Tensor]:
    """Compare `spec` with FullKV; pass `full_logits` back in to reuse FullKV's run across policies."""
    if full_logits is None:
        full_logits, _ = teacher_forced_logits(model, prompt, continuation, {"policy": "full"})
    logits, policies = teacher_forced_logits(model, prompt, continuation, spec)
    moved = sum(p.transfer_bytes() for p in policies) / max(1, len(continuation) - 1)
    f = Fidelity(kl_divergence(full_logits, logits).mean().item(), top1_agreement(full_logits, logits),
                 perplexity(logits, continuation), perplexity(full_logits, continuation), moved)
    return f, full_logits


def passkey_grid(model: Llama, tok, n_tokens: int, depths: list[float], seeds: list[int], spec,
                 max_new_tokens: int = 8) -> list[dict]:
    """Pass-key retrieval for every (depth, seed) pair: one row per trial."""
    rows = []
    for seed in seeds:
        for depth in depths:
            h = make_haystack(tok, n_tokens, depth=depth, seed=seed)
            res = generate(model, h.ids, max_new_tokens, SamplingParams(), spec, tok.eos_ids)
            text = tok.decode(res.generated_ids)
            rows.append({"depth": depth, "seed": seed, "key": h.key, "answer": text, "found": h.found(text),
                         "kv_bytes": res.kv_bytes()})
    return rows
