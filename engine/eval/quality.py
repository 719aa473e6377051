"""Quality of KV policies against FullKV on the same model and text: teacher-forced next-token
distributions (KL, top-1 agreement, perplexity) and pass-key retrieval.

Teacher forcing feeds the *same* continuation tokens to every cache, so the distributions are
compared position by position; a policy's errors then show up as KL rather than as a diverging
generation that is hard to compare.

Several policies are measured from one shared prefill: the prompt's forward pass does not depend on
the KV policy (policies only decide what to keep of each layer's K/V), so a `FanOut` hands every
layer's K/V to all of them and only the decode steps run per policy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.calibrate import kl_divergence  # the profile calibrates with it too
from engine.eval.haystack import make_haystack
from engine.graphs import Decoder
from engine.kv import build_policies
from engine.kv.base import KVPolicy
from engine.model import Llama


class FanOut(KVPolicy):
    """Stands in for one layer's policy during a shared prefill: passes K/V on to several."""
    name = "fanout"

    def __init__(self, policies: list[KVPolicy]):  # no storage of its own
        self.policies = policies
        self.q_window = max(p.q_window for p in policies)

    def prefill(self, k, v, q_window=None):
        for p in self.policies:  # each gets the last q_window queries it asked for
            p.prefill(k, v, q_window[:, :, -p.q_window:] if p.q_window else None)  # all of a shorter prompt's


@torch.inference_mode()
def shared_prefill(model: Llama, ids: list[int], specs: list, new: int) -> tuple[torch.Tensor, list[list[KVPolicy]]]:
    """Prefill `ids` once for every policy spec -> (last-position logits (1, vocab), per-spec policies)."""
    device, dtype = model.head.device, model.head.dtype
    per_spec = [build_policies(model.args, spec, len(ids) + new, device, dtype) for spec in specs]
    fan = [FanOut([pols[layer] for pols in per_spec]) for layer in range(model.args.n_layers)]
    return model.prefill(torch.tensor([ids], device=device), fan), per_spec


@torch.inference_mode()
def teacher_forced(model: Llama, prompt: list[int], continuation: list[int], specs: list):
    """For each spec: (logits (N, vocab) predicting each continuation token, its policies)."""
    device = model.head.device
    first, per_spec = shared_prefill(model, prompt, specs, len(continuation))
    out = []
    for policies in per_spec:
        logits, decoder = [first[0]], Decoder(model, policies)
        for i, tok in enumerate(continuation[:-1]):  # (a graph's output buffer is reused: clone)
            logits.append(decoder.step(torch.tensor([tok], device=device), len(prompt) + i)[0].clone())
        out.append((torch.stack(logits).float(), policies))
    return out


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


def compare(full: torch.Tensor, logits: torch.Tensor, continuation: list[int], moved: float = 0.0) -> Fidelity:
    """One policy's teacher-forced logits (N, vocab) against FullKV's on the same continuation."""
    return Fidelity(kl_divergence(full, logits).mean().item(), top1_agreement(full, logits),
                    perplexity(logits, continuation), perplexity(full, continuation), moved)


def fidelity_with_reference(model: Llama, prompt: list[int], continuation: list[int],
                            specs: list) -> tuple[torch.Tensor, list[Fidelity]]:
    """Each spec against FullKV on the same teacher-forced continuation; also returns FullKV's
    logits (N, vocab), so other engines (bench.py's peers) can be compared with the same reference."""
    runs = teacher_forced(model, prompt, continuation, [{"policy": "full"}] + list(specs))
    full = runs[0][0]
    out = []
    for logits, policies in runs[1:]:
        moved = sum(p.transfer_bytes() for p in policies) / max(1, len(continuation) - 1)
        out.append(compare(full, logits, continuation, moved))
    return full, out


def fidelity(model: Llama, prompt: list[int], continuation: list[int], specs: list) -> list[Fidelity]:
    """Each spec against FullKV on the same teacher-forced continuation."""
    return fidelity_with_reference(model, prompt, continuation, specs)[1]


@torch.inference_mode()
def greedy(model: Llama, policies: list[KVPolicy], first: torch.Tensor, pos: int, max_new_tokens: int,
           eos_ids) -> list[int]:
    """Greedy tokens after a prefill whose last logits are `first` (1, vocab) and whose prompt has
    `pos` tokens: up to max_new_tokens, stopping after an end-of-sequence token."""
    logits, ids, decoder = first, [], Decoder(model, policies)
    while True:
        token = logits.argmax(-1)
        ids.append(int(token))
        if ids[-1] in eos_ids or len(ids) == max_new_tokens:
            return ids
        logits = decoder.step(token, pos + len(ids) - 1)


@torch.inference_mode()
def passkey_grid(model: Llama, tok, n_tokens: int, depths: list[float], seeds: list[int], specs: list,
                 max_new_tokens: int = 8) -> list[list[dict]]:
    """Greedy pass-key retrieval for every (depth, seed) pair and every spec: one list of trial
    rows per spec. Each haystack is prefilled once for all specs; with none, nothing is run (bench.py's
    quality pass at a second kept fraction may have no policy of ours left, only peers)."""
    rows = [[] for _ in specs]
    if not specs:
        return rows
    for seed in seeds:
        for depth in depths:
            h = make_haystack(tok, n_tokens, depth=depth, seed=seed)
            first, per_spec = shared_prefill(model, h.ids, specs, max_new_tokens)
            for i, policies in enumerate(per_spec):
                ids = greedy(model, policies, first, len(h.ids), max_new_tokens, tok.eos_ids)
                kv = {"device": sum(p.nbytes()["device"] for p in policies),
                      "host": sum(p.nbytes()["host"] for p in policies)}
                text = tok.decode(ids)
                rows[i].append({"depth": depth, "seed": seed, "key": h.key, "answer": text,
                                "found": h.found(text), "kv_bytes": kv})
                per_spec[i] = None  # free this spec's cache before the next one decodes
    return rows
