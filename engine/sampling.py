"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), reproducible with a seed."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, Real) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise ValueError(f"top-k must be an int >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, Real) and 0 < self.top_p <= 1):  # NaN fails the comparison too
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (_is_int(self.seed) and -2**63 <= self.seed < 2**64):  # manual_seed's
            raise ValueError(f"seed must be an int in [-2**63, 2**64), got {self.seed!r}")


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) float32 -> token ids (B,)."""
    if p.temperature == 0:
        return logits.argmax(-1)
    # Shifted so that the largest logit is 0 before dividing: a tiny temperature (1e-38) then sends the
    # others to -inf, one-hot, where logits / T alone overflowed to inf and softmax gave NaN.
    logits = (logits - logits.amax(-1, keepdim=True)) / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass;
        # the most likely token is always kept.
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def make_generator(p: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    if p.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if p.seed is not None:
        gen.manual_seed(p.seed)
    else:
        gen.seed()
    return gen
