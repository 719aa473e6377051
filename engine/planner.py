"""Choose every layer's KV policy under one device-memory budget, from the profiler's statistics.

Each layer has options, each with a device byte cost (computed exactly as the policy allocates)
and a quality measured by the profile (engine/profile.py): 1 - the relative error of the layer's
attention output under it, weighted by what that kind of error costs at the model's output
(engine/calibrate.py: per unit of error 1-bit quantization costs many times what eviction does):
    Full           quality 1
    Evict(k)       1 - error of static eviction to k prompt tokens
    Offload(k, C)  1 - error of fetching k tokens per step, chunks of C
    Quant(b)       1 - w(b) x error at b bits, w(b) = its KL per unit of error over evict/offload's
XKV's modes (below) keep XKV's own measure, the retention R(k) of static eviction.
The hybrid planner starts every layer at its cheapest option (the floor: no layer gets zero
tokens), then spends the budget on upgrades in order of quality gained per byte. Upgrades are the
steps along each layer's upper convex hull of (bytes, quality), so a layer's steps come in
decreasing efficiency and taking a global prefix in efficiency order is well defined. Picking one
option per layer under a budget is a multiple-choice knapsack (NP-hard); this greedy solves its LP
relaxation exactly and the integer problem to within one upgrade's gain, and more budget never
lowers the total quality (the prefix only grows).

XKV's own modes allocate tokens to Evict layers (engine/xkv.py).
"""
from __future__ import annotations

import math

import torch

from engine.cli import fmt_bytes
from engine.config import ModelArgs
from engine.kv import spec_cost
from engine.plan import Option
from engine.layer_stats import FRACTIONS, QUANT_BITS, LayerStats
from engine.profile import ProfileConfig
from engine.xkv import allocate_tau, allocate_tokens

KINDS = ("full", "quant", "evict", "offload")  # the policies a hybrid plan chooses among
MODES = ("hybrid", "xkv", "xkv-tau", "uniform")  # make_plan's modes
# The fewest prompt tokens a plan's evict or offload option keeps in any layer (no layer is left with
# nothing; each option also keeps at least its own window, e.g. offload's sink + recent = 80). The API,
# profile_layers.py's --floor and the CLIs' budget checks all default to it. At 128k, 32 layers x 64
# tokens is 0.05% of FullKV: the floor only binds on very short prompts or tiny budgets.
FLOOR = 64


def make_option(args: ModelArgs, spec: dict, prompt: int, new: int, elem: int, quality: float) -> Option:
    cost = spec_cost(args, spec, prompt, new, elem)  # the policy prices itself
    return Option(spec, cost["device"], cost["host"], quality)


def harm_weights(stats: LayerStats) -> dict[str, float]:
    """Each kind's cost of a unit of attention-output error, relative to the token-selecting kinds'
    (engine/calibrate.py): evict and offload 1 (both keep real tokens: measured alike within the
    noise of one probe), each bit width its KL per unit over theirs, e.g. {"evict": 1, "offload": 1,
    "quant1": 14, "quant2": 4, "quant4": 0.5}. 1 where uncalibrated (statistics saved before the
    calibration, a prompt too short to run it, or no KL from the selecting kinds)."""
    harm = stats.harm or {}
    sel = [harm[k] for k in ("evict", "offload") if harm.get(k) is not None]
    ref = sum(sel) / len(sel) if sel else 0.0
    out = {"evict": 1.0, "offload": 1.0}
    for b in QUANT_BITS:
        h = harm.get(f"quant{b}")
        out[f"quant{b}"] = h / ref if h is not None and ref > 1e-12 else 1.0
    return out


def check_calibrated(stats: list[LayerStats], kinds: tuple[str, ...]) -> None:
    """Refuse to plan QuantKV from statistics whose profile did not calibrate it (profiled for evict
    and offload only, as on a CPU): its errors would be priced like eviction's, which they are not."""
    harm = stats[0].harm if stats else None
    if harm is None or "quant" not in kinds:
        return  # statistics saved before the calibration are priced alike, as they were then
    if not all(f"quant{b}" in harm for b in QUANT_BITS):
        raise ValueError("the profile did not calibrate quant (it was made for "
                         f"{', '.join(sorted(harm)) or 'evict/offload only'}); profile again with quant allowed")


def layer_options(args: ModelArgs, stats: LayerStats, prompt: int, new: int, elem: int,
                  cfg: ProfileConfig, floor: int, kinds: tuple[str, ...]) -> list[Option]:
    """Every option the profile measured for one layer, with its bytes and quality: 1 - its
    attention-output error, weighted by what that kind of error costs at the output (so a quality
    is 1 - an eviction-equivalent error, and may be negative)."""
    w = harm_weights(stats)
    opts = [make_option(args, {"policy": "full"}, prompt, new, elem, 1.0)]
    for i, f in enumerate(FRACTIONS[1:-1], start=1):
        k = round(f * prompt)
        if "evict" in kinds and k >= max(floor, cfg.evict["window"]):
            opts.append(make_option(args, {"policy": "evict", "budget": k, **cfg.evict}, prompt, new, elem,
                                    1 - w["evict"] * stats.evict_err[i]))
        if "offload" in kinds and k > max(floor, cfg.offload["sink"] + cfg.offload["recent"]):
            opts.append(make_option(args, {"policy": "offload", "budget": k, **cfg.offload}, prompt, new, elem,
                                    1 - w["offload"] * stats.offload_err[i]))
    if "quant" in kinds:
        for bits, err in stats.quant_err.items():
            spec = {"policy": "quant", "bits": bits, **cfg.quant}
            opts.append(make_option(args, spec, prompt, new, elem, 1.0 - w[f"quant{bits}"] * err))
    return opts


def budget_floor(args: ModelArgs, prompt: int, new: int, elem: int, cfg: ProfileConfig, floor: int,
                 kinds: tuple[str, ...]) -> int:
    """The fewest device bytes a hybrid plan can take: every layer at its cheapest option. Costs do
    not depend on the profile, so this is known before profiling (a budget below it is refused
    then, not after a long profiling pass)."""
    zeros = [0.0] * len(FRACTIONS)
    blank = LayerStats(0.0, zeros, zeros, zeros, {b: 0.0 for b in QUANT_BITS})
    cheapest = min(o.device_bytes for o in layer_options(args, blank, prompt, new, elem, cfg, floor, kinds))
    return args.n_layers * cheapest


def plan_kinds(kinds: str | tuple[str, ...], device: torch.device) -> tuple[str, ...]:
    """The policies a hybrid plan may use besides full: "quant,evict" or a tuple; "auto" is all
    three on CUDA and evict, offload on CPU, where unpacking codes costs more time than reading floats."""
    if kinds == "auto":
        return ("quant", "evict", "offload") if device.type == "cuda" else ("evict", "offload")
    kinds = tuple(filter(None, kinds.split(","))) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown plan policies {unknown}; choose from quant, evict, offload (full is always allowed)")
    return kinds


def evict_floor(floor: int, cfg: ProfileConfig) -> int:
    """The fewest prompt tokens an evict-only plan (xkv, xkv-tau, uniform) gives a layer: the floor,
    and at least the evict window each spec keeps anyway (a plan priced for fewer would go over)."""
    return max(floor, cfg.evict["window"])


def check_kv_budget(args: ModelArgs, kv_budget, context: int, new_tokens: int, elem: int, mode: str,
                    kinds: tuple[str, ...], floor: int = FLOOR) -> int:
    """kv_budget (bytes, '512MiB', or a fraction of FullKV: 0.2, '20%') in bytes for a plan of
    `context` + new_tokens tokens; a ValueError when no `mode` plan can meet it. Needs neither a
    profile nor the weights: the CLIs run it before loading them."""
    if mode not in MODES:
        raise ValueError(f"unknown plan mode {mode!r}; choose from {', '.join(MODES)}")
    if new_tokens < 0:
        raise ValueError(f"new_tokens must be >= 0, got {new_tokens}")
    budget = parse_kv_budget(str(kv_budget), args.kv_bytes_per_token(elem) * (context + new_tokens))
    if mode == "hybrid":
        least = budget_floor(args, context, new_tokens, elem, ProfileConfig(), floor, kinds + ("full",))
    elif mode in ("xkv", "uniform"):  # evict only: every layer keeps the floor's prompt tokens and the new ones
        floor = evict_floor(floor, ProfileConfig())
        least = (min(floor, context) + new_tokens) * args.kv_bytes_per_token(elem)
    else:
        return budget  # xkv-tau: the fewest tokens reaching its retention target, whatever the budget
    if budget < least:
        what = {"hybrid": "a plan", "xkv": "an xkv plan", "uniform": "a uniform plan"}[mode]
        raise ValueError(f"KV budget {fmt_bytes(budget)} is below the least {what} for {context} tokens can take, "
                         f"{fmt_bytes(least)} (every layer at its cheapest option, keeping at least "
                         f"{min(floor, context)} prompt tokens)")
    return budget


def upper_hull(opts: list[Option]) -> list[Option]:
    """The options on the upper-left convex frontier of (bytes, quality), cheapest first."""
    pts = sorted(opts, key=lambda o: (o.device_bytes, -o.quality))
    frontier = []
    for o in pts:  # drop options no better than a cheaper one
        if not frontier or o.quality > frontier[-1].quality:
            frontier.append(o)
    hull = []
    for o in frontier:  # keep slopes decreasing (concave)
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (b.quality - a.quality) * (o.device_bytes - a.device_bytes) <= \
               (o.quality - a.quality) * (b.device_bytes - a.device_bytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def greedy_choose(hulls: list[list[Option]], budget: int) -> list[int]:
    """Index into each layer's hull: start at 0, take upgrades by gain per byte while they fit."""
    choice = [0] * len(hulls)
    spent = sum(h[0].device_bytes for h in hulls)
    if spent > budget:
        raise ValueError(f"KV budget {budget} bytes is below the floor of {spent} bytes (every layer at its "
                         f"cheapest option)")
    steps = []
    for layer, h in enumerate(hulls):
        slope = math.inf
        for j in range(1, len(h)):
            cost = h[j].device_bytes - h[j - 1].device_bytes
            # A hull's slopes decrease, but dividing can round two nearly equal ones out of order, and
            # step j + 1 taken before step j would move the layer back: keep them in order.
            slope = min(slope, (h[j].quality - h[j - 1].quality) / cost)
            steps.append((slope, layer, j, cost))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))  # within a layer, hull order is efficiency order
    for _, layer, j, cost in steps:
        if spent + cost > budget:
            break  # stop at the first upgrade that does not fit: a prefix, hence monotone in budget
        choice[layer], spent = j, spent + cost
    return choice


def plan_hybrid(args: ModelArgs, stats: list[LayerStats], prompt: int, new: int, elem: int, budget: int,
                cfg: ProfileConfig | None = None, floor: int = FLOOR,
                kinds: tuple[str, ...] = KINDS) -> list[Option]:
    cfg = cfg or ProfileConfig()
    check_calibrated(stats, kinds)
    hulls = [upper_hull(layer_options(args, s, prompt, new, elem, cfg, floor, kinds)) for s in stats]
    return [h[j] for h, j in zip(hulls, greedy_choose(hulls, budget))]


_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}


def parse_bytes(text: str) -> int | None:
    """'512MiB', '2GiB', '24G', '300MB', '1.5 GiB' -> bytes (a bare G/M/K is binary); None when the
    text names no unit. Raises ValueError on a number that is not one, or not finite and positive."""
    t = text.strip().lower().replace(" ", "")
    t = t + "ib" if t[-1:] in ("k", "m", "g") else t
    for unit, mult in _UNITS.items():
        if t.endswith(unit):
            try:
                x = float(t[:-len(unit)])
            except ValueError:
                raise ValueError(f"not a size: {text!r} (examples: 512MiB, 24GiB)") from None
            if not (math.isfinite(x) and x > 0):
                raise ValueError(f"a size must be positive and finite, got {text!r}")
            return int(x * mult)
    return None


def parse_kv_budget(text: str, full_bytes: int) -> int:
    """'512MiB', '2GiB', '300MB', '123456' (bytes) or a fraction of FullKV: '0.2', '20%' -> bytes."""
    t = text.strip()
    sized = parse_bytes(t) if t else None
    if sized is not None:
        return sized
    try:
        x = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(f"not a KV budget: {text!r} (examples: 512MiB, 2GiB, 0.2, 20%)") from None
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"KV budget must be positive and finite, got {text!r}")
    if t.endswith("%") and x > 1:  # bytes above FullKV's buy nothing: the plan is FullKV everywhere
        raise ValueError(f"KV budget {text!r} is more than FullKV's bytes; a fraction is at most 100%")
    if x > 1 and not t.isdigit():  # '2.0', '1.5', '1e9': neither a fraction nor plainly a byte count
        raise ValueError(f"KV budget {text!r}: a fraction of FullKV is at most 1; give bytes as a whole "
                         f"number or with a unit (512MiB)")
    return int(x * full_bytes) if x <= 1 else int(x)  # a fraction (a percentage is one by now), or bytes


def make_plan(args: ModelArgs, stats: list[LayerStats], prompt: int, new: int, elem: int, budget: int,
              mode: str = "hybrid", cfg: ProfileConfig | None = None, floor: int = FLOOR,
              tau: float | None = None, kinds: tuple[str, ...] = KINDS) -> list[Option]:
    """mode 'hybrid': every option, greedy per byte. 'xkv': Evict only, XKV's token allocation of the
    same byte budget ('xkv-tau': the fewest tokens reaching mean retention tau; budget ignored).
    'uniform': Evict with the same tokens in every layer."""
    cfg = cfg or ProfileConfig()
    if mode == "hybrid":
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown policies {sorted(unknown)} for a plan; choose from {', '.join(KINDS)}")
        return plan_hybrid(args, stats, prompt, new, elem, budget, cfg, floor, tuple(kinds) + ("full",))
    per_tok = 2 * args.n_kv_heads * args.head_dim * elem
    L = args.n_layers
    floor = evict_floor(floor, cfg)
    if mode == "xkv-tau":
        tokens = allocate_tau([s.evict for s in stats], prompt, tau, floor)
    else:
        total = budget // per_tok - L * new  # prompt tokens the budget pays for, all layers together
        if mode == "xkv":
            tokens = allocate_tokens([s.evict for s in stats], prompt, total, floor)
        elif mode == "uniform":
            if total < L * min(floor, prompt):  # check_kv_budget refuses such budgets before profiling
                raise ValueError(f"token budget {total} is below the floor of {L} layers x {min(floor, prompt)} tokens")
            tokens = [max(min(floor, prompt), total // L)] * L
        else:
            raise ValueError(f"unknown plan mode {mode!r}")
    out = []
    for s, k in zip(stats, tokens):
        spec = {"policy": "evict", "budget": max(k, cfg.evict["window"]), **cfg.evict}
        i = min(range(len(FRACTIONS)), key=lambda j: abs(FRACTIONS[j] * prompt - k))
        out.append(make_option(args, spec, prompt, new, elem, s.evict[i]))
    return out
