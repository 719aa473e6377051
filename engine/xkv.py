"""XKV's token allocation: how many prompt tokens each evicting layer keeps, from its retention curve.

A layer's retention R(k) is the share of the decode queries' attention that its k best-scored prompt
tokens hold (engine/profile.py measures it at FRACTIONS of the prompt). XKV allocates either a total
token budget so as to maximise mean retention over layers (allocate_tokens), or the fewest tokens
whose mean retention reaches a target tau (allocate_tau). When every R(k) is concave, taking the
largest marginal gains token by token, over all layers, is optimal for both; the profiler's curves can
dip (tokens ranked by the prompt's last queries, retention measured with the decode queries'), so each
is first replaced by its concave majorant, on which the greedy is exact and which meets the curve at
its corners. allocate_tau then moves a layer that stops inside a dip on to where the curve itself
holds what was counted (out_of_dip), so the target is met on the measured curves, not only on their
majorants.
"""
from __future__ import annotations

import torch

from engine.layer_stats import FRACTIONS


def concave_majorant(xs: list[float], ys: list[float]) -> list[float]:
    """The least concave curve on or above the points (xs increasing), at xs. Example: (0, 0),
    (1, .2), (2, .8), (3, .9) -> 0, .4, .8, .9 (the dip at 1 is bridged from 0 to 2)."""
    hull: list[int] = []
    for i in range(len(xs)):  # drop a point below the chord from the one before it to point i
        while len(hull) >= 2 and (ys[hull[-1]] - ys[hull[-2]]) * (xs[i] - xs[hull[-2]]) <= \
                (ys[i] - ys[hull[-2]]) * (xs[hull[-1]] - xs[hull[-2]]):
            hull.pop()
        hull.append(i)
    out = []
    for x in xs:
        j = max(n for n in range(len(hull)) if xs[hull[n]] <= x)
        a, b = hull[j], hull[min(j + 1, len(hull) - 1)]
        out.append(ys[a] if a == b else ys[a] + (ys[b] - ys[a]) * (x - xs[a]) / (xs[b] - xs[a]))
    return out


def interpolate(curve: list[float], prompt: int) -> torch.Tensor:
    """Retention after k = 0..prompt kept tokens, (prompt + 1,) float64: the curve, sampled at
    FRACTIONS of the prompt, interpolated linearly between its samples."""
    ks = torch.tensor([f * prompt for f in FRACTIONS], dtype=torch.float64)
    r = torch.tensor(list(curve), dtype=torch.float64)
    at = torch.arange(prompt + 1, dtype=torch.float64)
    idx = torch.searchsorted(ks, at, right=True).clamp(1, len(ks) - 1)
    x0, x1 = ks[idx - 1], ks[idx]
    return r[idx - 1] + (r[idx] - r[idx - 1]) * (at - x0) / (x1 - x0).clamp_min(1e-12)


def token_gains(curve: list[float], prompt: int) -> torch.Tensor:
    """Marginal retention of the k-th kept token, k = 1..prompt, (prompt,), on the curve made
    concave: the profile ranks tokens by the prompt's last queries and measures what they keep with
    the decode queries', so a curve can dip, and taking the largest gains first is optimal only when
    each layer's gains never increase (on the default model all 30 layers' curves dipped somewhere
    at 1k tokens)."""
    return interpolate(concave_majorant([f * prompt for f in FRACTIONS], list(curve)), prompt).diff()


def allocate_tokens(curves: list[list[float]], prompt: int, total: int, floor: int) -> list[int]:
    """XKV: tokens per layer maximising mean retention with `total` tokens, each layer >= floor."""
    L = len(curves)
    floor = min(floor, prompt)
    if total < L * floor:
        raise ValueError(f"token budget {total} is below the floor of {L} layers x {floor} tokens")
    gains = torch.stack([token_gains(c, prompt)[floor:] for c in curves])  # (L, prompt - floor)
    extra = min(total - L * floor, gains.numel())
    picked = torch.zeros_like(gains, dtype=torch.bool).view(-1)
    picked[gains.view(-1).topk(extra).indices] = True
    return [floor + int(n) for n in picked.view(L, -1).sum(-1)]


def allocate_tau(curves: list[list[float]], prompt: int, tau: float, floor: int) -> list[int]:
    """XKV: the fewest tokens per layer whose mean retention reaches tau, each layer >= floor.

    Every layer starts at `floor` tokens; then the single largest marginal gains, over all layers,
    are taken until the mean retention reaches tau. Example, 2 layers, floor 1, retention after
    1/2/3 tokens A: .5/.8/.9, B: .2/.4/.6 (both 0 at 0 tokens), tau = 0.6:
        start: A 1, B 1 -> retention .5 + .2 = .7 (mean .35); gains left, best first:
        A's 2nd token +.3 (mean .50), B's 2nd +.2 (mean .60 >= tau: stop) -> [2, 2].
    Each layer's gains never increase (its concave majorant's), so no other choice of 4 tokens does
    better on the majorants; a layer left inside a dip then takes the tokens out of it."""
    L = len(curves)
    floor = min(floor, prompt)
    per_layer = [token_gains(c, prompt) for c in curves]  # (prompt,) each
    gains = torch.stack([g[floor:] for g in per_layer])
    base = sum(float(g[:floor].sum()) + c[0] for g, c in zip(per_layer, curves))
    order = gains.view(-1).sort(descending=True)
    reached = (base + order.values.cumsum(0)) / L >= tau
    n = int(reached.nonzero()[0]) + 1 if reached.any() else gains.numel()
    if base / L >= tau:
        n = 0
    picked = torch.zeros(gains.numel(), dtype=torch.bool)
    picked[order.indices[:n]] = True
    return [out_of_dip(c, prompt, floor + int(n)) for c, n in zip(curves, picked.view(L, -1).sum(-1))]


def out_of_dip(curve: list[float], prompt: int, k: int) -> int:
    """The fewest tokens >= k whose retention on the curve itself reaches its majorant's at k. Inside
    a bridged dip the curve lies below the majorant that allocate_tau counted on (a mean up to
    ~0.002 short of tau on shuffled curves); the dip's right end, where the two meet again, always
    reaches it. Example: samples 0, .2, .8, .9 at 0..3 tokens, majorant 0, .4, .8, .9: k = 1 holds
    .2 where .4 was counted, so 2 tokens (.8) are kept (the real samples are at FRACTIONS)."""
    want = float(interpolate(concave_majorant([f * prompt for f in FRACTIONS], list(curve)), prompt)[k])
    hits = (interpolate(curve, prompt)[k:] >= want - 1e-12).nonzero()
    return k + int(hits[0]) if len(hits) else k  # none: a curve that falls (hand-made), left as counted
