"""Choose every layer's KV policy under one device-memory budget, from the profiler's statistics.

Each layer has options, each with a device byte cost (computed exactly as the policy allocates)
and a quality measured by the profile (engine/profile.py):
    Full           quality 1
    Quant(b)       1 - relative error of the attention output at b bits
    Evict(k)       retention R(k) of static eviction to k prompt tokens (XKV)
    Offload(k, C)  attention mass on the tokens OffloadKV would fetch with budget k
The hybrid planner starts every layer at its cheapest option (the floor: no layer gets zero
tokens), then spends the budget on upgrades in order of quality gained per byte. Upgrades are the
steps along each layer's upper convex hull of (bytes, quality), so a layer's steps come in
decreasing efficiency and taking a global prefix in efficiency order is well defined. Picking one
option per layer under a budget is a multiple-choice knapsack (NP-hard); this greedy solves its LP
relaxation exactly and the integer problem to within one upgrade's gain, and more budget never
lowers the total quality (the prefix only grows).

XKV's own modes allocate tokens to Evict layers: a total token budget (maximise mean retention) or
a retention target tau (least tokens). Sorted scores make R(k) concave, so taking the largest
marginal gains token by token is optimal there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelArgs
from engine.profile import FRACTIONS, LayerStats, ProfileConfig

KINDS = ("full", "quant", "evict", "offload")  # the policies a hybrid plan chooses among


@dataclass
class Option:
    spec: dict          # policy parameters, as build_policies takes them
    device_bytes: int
    host_bytes: int
    quality: float


def option_bytes(args: ModelArgs, spec: dict, prompt: int, new: int, elem: int) -> tuple[int, int]:
    """(device, host) bytes the policy `spec` holds for a prompt of `prompt` tokens followed by
    `new` decoded ones: the same arithmetic as the policies' allocations (tests check nbytes())."""
    H, D, cap = args.n_kv_heads, args.head_dim, prompt + new
    per_tok = 2 * H * D * elem
    kind = spec["policy"]
    if kind == "full":
        return cap * per_tok, 0
    if kind == "evict":
        return (min(prompt, spec["budget"]) + new) * per_tok, 0
    if kind == "offload":
        S = min(spec["sink"], prompt)
        W = min(spec["recent"], prompt - S)
        M = prompt - S - W
        top = min(spec["budget"] - spec["sink"] - spec["recent"], M)
        dev = (S + top + W + new) * per_tok
        if top < M:  # sketch (M x C), channel ids and the selected-token ids (int64)
            dev += H * M * spec["channels"] * elem + H * spec["channels"] * 8 + H * top * 8
            return dev, 2 * H * M * D * elem
        return dev, 0
    if kind == "quant":
        b, G, R = spec["bits"], spec["group"], spec["residual"]
        max_kq, max_vq = (cap - 1) // R * R, max(0, cap - R)
        codes = H * (max_kq + max_vq) * D * b // 8
        scales = 2 * H * (max_kq // G * D + max_vq * (D // G)) * elem
        return codes + scales + min(R, cap) * per_tok, 0
    raise ValueError(f"no byte model for policy {kind!r}")


def layer_options(args: ModelArgs, stats: LayerStats, prompt: int, new: int, elem: int,
                  cfg: ProfileConfig, floor: int, kinds: tuple[str, ...]) -> list[Option]:
    opts = []

    def add(spec, quality):
        dev, host = option_bytes(args, spec, prompt, new, elem)
        opts.append(Option(spec, dev, host, quality))

    add({"policy": "full"}, 1.0)
    for i, f in enumerate(FRACTIONS[1:-1], start=1):
        k = round(f * prompt)
        if "evict" in kinds and k >= max(floor, cfg.window):
            add({"policy": "evict", "budget": k, "window": cfg.window, "pool": cfg.pool}, stats.evict[i])
        if "offload" in kinds and k > max(floor, cfg.sink + cfg.recent):
            add({"policy": "offload", "budget": k, "sink": cfg.sink, "recent": cfg.recent,
                 "channels": cfg.channels}, stats.offload[i])
    if "quant" in kinds:
        for bits, err in stats.quant_err.items():
            add({"policy": "quant", "bits": bits, "group": cfg.group_for(args.head_dim), "residual": cfg.quant_residual},
                max(0.0, 1.0 - err))
    return opts


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
        for j in range(1, len(h)):
            cost = h[j].device_bytes - h[j - 1].device_bytes
            steps.append(((h[j].quality - h[j - 1].quality) / cost, layer, j, cost))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))  # within a layer, hull order is efficiency order
    for _, layer, j, cost in steps:
        if spent + cost > budget:
            break  # stop at the first upgrade that does not fit: a prefix, hence monotone in budget
        choice[layer], spent = j, spent + cost
    return choice


def plan_hybrid(args: ModelArgs, stats: list[LayerStats], prompt: int, new: int, elem: int, budget: int,
                cfg: ProfileConfig | None = None, floor: int = 64,
                kinds: tuple[str, ...] = KINDS) -> list[Option]:
    cfg = cfg or ProfileConfig()
    hulls = [upper_hull(layer_options(args, s, prompt, new, elem, cfg, floor, kinds)) for s in stats]
    return [h[j] for h, j in zip(hulls, greedy_choose(hulls, budget))]


def _token_gains(curve: list[float], prompt: int) -> torch.Tensor:
    """Marginal retention of the k-th kept token, k = 1..prompt, by linear interpolation of the
    profiled curve (sampled at FRACTIONS of the prompt)."""
    ks = torch.tensor([f * prompt for f in FRACTIONS], dtype=torch.float64)
    r = torch.tensor(curve, dtype=torch.float64)
    at = torch.arange(prompt + 1, dtype=torch.float64)
    idx = torch.searchsorted(ks, at, right=True).clamp(1, len(ks) - 1)
    x0, x1 = ks[idx - 1], ks[idx]
    vals = r[idx - 1] + (r[idx] - r[idx - 1]) * (at - x0) / (x1 - x0).clamp_min(1e-12)
    return vals.diff()  # (prompt,)


def allocate_tokens(curves: list[list[float]], prompt: int, total: int, floor: int) -> list[int]:
    """XKV: tokens per layer maximising mean retention with `total` tokens, each layer >= floor."""
    L = len(curves)
    floor = min(floor, prompt)
    if total < L * floor:
        raise ValueError(f"token budget {total} is below the floor of {L} layers x {floor} tokens")
    gains = torch.stack([_token_gains(c, prompt)[floor:] for c in curves])  # (L, prompt - floor)
    extra = min(total - L * floor, gains.numel())
    picked = torch.zeros_like(gains, dtype=torch.bool).view(-1)
    picked[gains.view(-1).topk(extra).indices] = True
    return [floor + int(n) for n in picked.view(L, -1).sum(-1)]


def allocate_tau(curves: list[list[float]], prompt: int, tau: float, floor: int) -> list[int]:
    """XKV: the fewest tokens per layer whose mean retention reaches tau, each layer >= floor."""
    L = len(curves)
    floor = min(floor, prompt)
    gains = torch.stack([_token_gains(c, prompt)[floor:] for c in curves])
    base = sum(float(_token_gains(c, prompt)[:floor].sum()) + c[0] for c in curves)
    order = gains.view(-1).sort(descending=True)
    reached = (base + order.values.cumsum(0)) / L >= tau
    n = int(reached.nonzero()[0]) + 1 if reached.any() else gains.numel()
    if base / L >= tau:
        n = 0
    picked = torch.zeros(gains.numel(), dtype=torch.bool)
    picked[order.indices[:n]] = True
    return [floor + int(c) for c in picked.view(L, -1).sum(-1)]


def parse_kv_budget(text: str, full_bytes: int) -> int:
    """'512MiB', '2GiB', '300MB', '123456' (bytes) or a fraction of FullKV: '0.2', '20%' -> bytes."""
    t = text.strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    try:
        if t.endswith("%"):
            return int(float(t[:-1]) / 100 * full_bytes)
        for unit, mult in units.items():
            if t.lower().endswith(unit):
                return int(float(t[:-len(unit)]) * mult)
        x = float(t)
    except ValueError:
        raise ValueError(f"not a KV budget: {text!r} (examples: 512MiB, 2GiB, 0.2, 20%)") from None
    if x <= 0:
        raise ValueError(f"KV budget must be positive, got {text!r}")
    return int(x * full_bytes) if x <= 1 else int(x)


def make_plan(args: ModelArgs, stats: list[LayerStats], prompt: int, new: int, elem: int, budget: int,
              mode: str = "hybrid", cfg: ProfileConfig | None = None, floor: int = 64,
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
    if mode == "xkv-tau":
        tokens = allocate_tau([s.evict for s in stats], prompt, tau, floor)
    else:
        total = budget // per_tok - L * new  # prompt tokens the budget pays for, all layers together
        if mode == "xkv":
            tokens = allocate_tokens([s.evict for s in stats], prompt, total, floor)
        elif mode == "uniform":
            tokens = [max(floor, total // L)] * L
        else:
            raise ValueError(f"unknown plan mode {mode!r}")
    out = []
    for s, k in zip(stats, tokens):
        spec = {"policy": "evict", "budget": max(k, cfg.window), "window": cfg.window, "pool": cfg.pool}
        dev, host = option_bytes(args, spec, prompt, new, elem)
        i = min(range(len(FRACTIONS)), key=lambda j: abs(FRACTIONS[j] * prompt - k))
        out.append(Option(spec, dev, host, s.evict[i]))
    return out


# ---- plans on disk: JSON, one readable line per layer ------------------------------------------
_SPEC_ONLY = ("layer", "quality", "device_bytes", "host_bytes")


def save_plan(path: str, header: dict, layers: list[Option]) -> None:
    import json
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()]
    lines.append('  "layers": [')
    for i, o in enumerate(layers):
        row = {"layer": i, **o.spec, "quality": round(o.quality, 4), "device_bytes": o.device_bytes,
               "host_bytes": o.host_bytes}
        lines.append(f"    {json.dumps(row)}{',' if i + 1 < len(layers) else ''}")
    lines += ["  ]", "}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def load_plan(path: str, model: str, n_layers: int) -> tuple[dict, list[dict]]:
    """-> (header, per-layer policy specs). Refuses a plan made for another model or depth."""
    import json
    try:
        with open(path) as f:
            plan = json.load(f)
        layers = plan["layers"]
        header = {k: v for k, v in plan.items() if k != "layers"}
        specs = [{k: v for k, v in row.items() if k not in _SPEC_ONLY} for row in layers]
        if not all("policy" in s for s in specs):
            raise KeyError("policy")
    except OSError as e:
        raise ValueError(f"cannot read plan {path}: {e.strerror}") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a KV plan ({type(e).__name__}: {e})") from None
    if header.get("model") != model:
        raise ValueError(f"{path}: plan was made for model {header.get('model')!r}, not {model!r}")
    if len(specs) != n_layers:
        raise ValueError(f"{path}: plan has {len(specs)} layers, the model has {n_layers}")
    return header, specs
