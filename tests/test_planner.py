"""The planner: evict-only plans within their budgets (XKV's allocation itself: tests/test_xkv.py);
the hybrid greedy monotone and within one upgrade of the optimum; a layer's options; the KV budget
syntax; each policy's class-level cost == its nbytes(); plans round-trip through JSON and are
refused for another model."""
import itertools
import random

import pytest
import torch

from engine.config import preset
from engine.kv import build_policies, spec_cost
from engine.plan import Option, Plan
from engine.planner import greedy_choose, upper_hull
from engine.layer_stats import FRACTIONS
from stepping import attend_next


def test_greedy_keeps_a_layers_steps_in_order_when_slopes_round_out_of_order():
    """Nearly collinear options: dividing rounds the second slope above the first, and taking step 2
    before step 1 once left the layer at option 1 with option 2's bytes spent."""
    q = [1.133130191562456, 21.128254789061398, 21.961384980623855, 32.79207747093578, 36.1245982371856]
    hull = [Option({"policy": "x"}, b * 10**9, 0, qi) for b, qi in zip([1, 25, 26, 39, 43], q)]
    assert greedy_choose([hull], 26 * 10**9) == [2]


def random_hulls(rng, L, n):
    hulls = []
    for _ in range(L):
        opts = [Option({"policy": "x"}, rng.randint(1, 60), 0, rng.random()) for _ in range(n)]
        hulls.append(upper_hull(opts))
    return hulls


@pytest.mark.parametrize("seed", range(6))
def test_hybrid_greedy_budget_monotone_and_near_optimal(seed):
    rng = random.Random(seed)
    hulls = random_hulls(rng, 4, 6)
    floor = sum(h[0].device_bytes for h in hulls)
    max_step = max((h[j].quality - h[j - 1].quality) for h in hulls for j in range(1, len(h))) if any(
        len(h) > 1 for h in hulls) else 0.0
    prev = -1.0
    for budget in range(floor, floor + 200, 7):
        choice = greedy_choose(hulls, budget)
        cost = sum(h[j].device_bytes for h, j in zip(hulls, choice))
        gain = sum(h[j].quality for h, j in zip(hulls, choice))
        assert cost <= budget
        assert gain >= prev - 1e-12  # more budget never lowers quality
        prev = gain
        best = max(sum(h[j].quality for h, j in zip(hulls, js))
                   for js in itertools.product(*(range(len(h)) for h in hulls))
                   if sum(h[j].device_bytes for h, j in zip(hulls, js)) <= budget)
        assert best - max_step - 1e-12 <= gain <= best + 1e-12
    with pytest.raises(ValueError, match="floor"):
        greedy_choose(hulls, floor - 1)


def test_upper_hull_is_concave_and_increasing():
    rng = random.Random(3)
    h = random_hulls(rng, 1, 30)[0]
    slopes = [(b.quality - a.quality) / (b.device_bytes - a.device_bytes) for a, b in zip(h, h[1:])]
    assert all(s > 0 for s in slopes) and all(x >= y for x, y in zip(slopes, slopes[1:]))


ARGS = preset("tiny", vocab_size=300, n_heads=4, n_kv_heads=2, dim=128, n_layers=1)


def test_layer_options_follow_the_kinds_and_the_floor():
    """A layer's options: FullKV, then only the kinds asked for; an eviction budget never below the
    floor or its window, an offload budget above both the floor and sink + recent (so it offloads
    something). At 1024 tokens the profile's budgets are multiples of 16 (FRACTIONS = i / 64)."""
    from engine.layer_stats import LayerStats
    from engine.planner import layer_options
    from engine.profile import ProfileConfig
    n = len(FRACTIONS)
    stats = LayerStats(0.1, [0.9] * n, [0.1] * n, [0.2] * n, {1: 0.1, 2: 0.05, 4: 0.01})
    cfg = ProfileConfig()
    assert cfg.evict["window"] == 32 and cfg.offload["sink"] + cfg.offload["recent"] == 80  # the defaults

    def budgets(kinds, floor):
        opts = layer_options(ARGS, stats, 1024, 0, 4, cfg, floor, kinds)
        assert opts[0].spec == {"policy": "full"}
        out = {}
        for o in opts[1:]:
            out.setdefault(o.spec["policy"], []).append(o.spec.get("budget", o.spec.get("bits")))
        return out

    assert budgets(("offload",), 64) == {"offload": list(range(96, 1024, 16))}
    assert budgets(("evict", "quant"), 64) == {"evict": list(range(64, 1024, 16)), "quant": [1, 2, 4]}
    assert budgets(("evict", "offload"), 16)["evict"][0] == 32  # the window, when the floor is lower
    assert budgets(("evict", "offload"), 200)["offload"][0] == 208


@pytest.mark.parametrize("spec", [
    {"policy": "full"},
    {"policy": "evict", "budget": 40, "window": 8},
    {"policy": "evict", "budget": 400, "window": 8},
    {"policy": "evict", "budget": 40, "window": 8, "evict_during_decode": True},
    {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8},
    {"policy": "offload", "budget": 480, "sink": 4, "recent": 12, "channels": 8},
    {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8, "chunk": 5},  # 134 = 26 x 5 + 4
    {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8, "host": "model"},
    {"policy": "quant", "bits": 2, "group": 32, "residual": 64},
    {"policy": "quant", "bits": 4, "group": 16, "residual": 32},
    {"policy": "quant", "bits": 2, "group": 32, "residual": 64, "rotate": "kv"},
    {"policy": "quant"},  # every default, the group resolved from head_dim
])
def test_byte_model_matches_policies(spec):
    prompt, new = 150, 10
    pol = build_policies(ARGS, spec, prompt + new, "cpu", torch.float32)[0]
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, prompt, 32, generator=g), torch.randn(1, 2, prompt, 32, generator=g)
    pol.prefill(k, v, torch.randn(1, 4, 32, 32, generator=g))
    attend_next(pol, torch.randn(1, 4, 1, 32, generator=g), k[:, :, :1], v[:, :, :1])  # steady state
    assert spec_cost(ARGS, spec, prompt, new, 4) == pol.nbytes()


def test_plan_json_round_trip_and_refusals(tmp_path):
    layers = [Option({"policy": "quant", "bits": 4, "group": 64, "residual": 128}, 10, 0, 0.9),
              Option({"policy": "evict", "budget": 100, "window": 32, "pool": 7}, 5, 0, 0.8)]
    path = tmp_path / "plan.json"
    Plan(layers, {"model": "m", "n_layers": 2, "context": 4096}).save(str(path))
    lines = path.read_text().splitlines()
    assert sum('"layer":' in ln for ln in lines) == 2  # one readable line per layer
    plan = Plan.load(str(path))
    assert plan.header["context"] == 4096 and plan.layers == layers
    plan.check("m", 2)
    with pytest.raises(ValueError, match=f"^{path}: plan was made for model 'm', not 'other'"):
        plan.check("other", 2)  # the error names the file the plan came from
    with pytest.raises(ValueError, match="^given.json: plan has 2 layers, the model has 3"):
        plan.check("m", 3, "given.json")
    assert Plan(layers + layers[:1], {}).summary() == "1 evict, 2 quant layers"
    bad = tmp_path / "bad.json"
    for text in ("[1, 2]", '{"layers": [{"budget": 3}]}', '{"layers": [{"policy": "full", "quality": "x"}]}'):
        bad.write_text(text)
        with pytest.raises(ValueError, match="not a KV plan"):
            Plan.load(str(bad))


def test_shipped_tailorkv_shaped_plan():
    """docs/plans/tailorkv_shape_random8b.json: layer 0 quantized, 31 offload layers at budget 2048,
    for random:llama-3.1-8b at 128k; its bytes are the policies' own cost and under 10% of FullKV."""
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "plans",
                        "tailorkv_shape_random8b.json")
    plan = Plan.load(path)
    args = preset("llama-3.1-8b")
    plan.check("random:llama-3.1-8b", args.n_layers, path)
    assert [s["policy"] for s in plan.specs] == ["quant"] + ["offload"] * 31
    T, new = plan.header["context"], plan.header["new_tokens"]
    assert all(spec_cost(args, o.spec, T, new, 2)["device"] == o.device_bytes for o in plan.layers)
    assert plan.device_bytes <= 0.10 * args.kv_bytes_per_token(2) * (T + new)
    build_policies(args, plan.specs, T + new, "cpu", torch.bfloat16)  # every spec valid (nothing allocated yet)


@pytest.mark.parametrize("name", ["smollm2_1bit_layers", "smollm2_1bit_clip_layers", "smollm2_hybrid_quant_10pct"])
def test_shipped_smollm2_plans_price_as_recorded(name):
    """The measured SmolLM2 plans of docs/RESULTS.md run as they were measured: a default that changed since
    (QuantKV's 8-bit ranges at 1-2 bits, OffloadKV's 8-bit host store) is pinned in the file, so
    every layer's spec still prices (float32) to the bytes recorded beside it. One change could not be
    pinned: OffloadKV's key sketch is 4-bit codes since 2026-11-29 (it was float32 values), so the
    one offload layer of smollm2_hybrid_quant_10pct was re-priced (732480 -> 395328 bytes)."""
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "plans",
                        f"{name}.json")
    plan = Plan.load(path)
    args = preset("smollm2-135m")
    T, new = plan.header["context"], plan.header["new_tokens"]
    assert [spec_cost(args, o.spec, T, new, 4) for o in plan.layers] == \
        [{"device": o.device_bytes, "host": o.host_bytes} for o in plan.layers]


def test_profile_takes_the_whole_prompt_when_it_fits(monkeypatch):
    """The profile's cache is a FullKV: the whole prompt is profiled when that fits in half the free
    memory (a middle cut once dropped the pass key at 8k and the plan lost it), else the middle is
    cut to what fits, never below 4096 tokens."""
    import engine.api
    import engine.fit
    from engine import LLM
    llm = LLM("random:tiny", "cpu", "float32")
    per_token = llm.full_kv_bytes(1)
    monkeypatch.setattr(engine.fit, "free_memory", lambda device: 2 * 6000 * per_token)
    assert llm.profile_limit() == 6000
    monkeypatch.setattr(engine.fit, "free_memory", lambda device: 1000)
    assert llm.profile_limit() == 4096
    seen = []
    monkeypatch.setattr(engine.api, "profile_prompt", lambda model, ids, cfg, progress: seen.append(len(ids)) or [])
    monkeypatch.setattr(engine.api, "average", lambda stats: stats)
    llm.profile([list(range(5000))])  # "auto": 4096 with so little memory
    monkeypatch.setattr(engine.fit, "free_memory", lambda device: 2 * 6000 * per_token)
    llm.profile([list(range(5000))])  # fits: whole
    llm.profile([list(range(5000))], profile_tokens=1000)  # an explicit cut
    assert seen == [4096, 5000, 1000]


def test_hybrid_reports_profiling_and_prefill_progress_apart():
    """A hybrid's profiling pass is a prefill of its own (seconds to minutes at long contexts): it
    reports its layers through on_profile_layer before stream() returns; the prefill's come later,
    through on_layer (generate.py draws both with one progress bar, relabelled between them)."""
    from engine import LLM
    llm = LLM("random:tiny", "cpu", "float32")
    profiled, prefilled = [], []
    s = llm.stream(list(range(2, 300)), 2, "hybrid", 0.5, on_layer=prefilled.append,
                   on_profile_layer=profiled.append, kinds="evict,offload")
    assert profiled == [1] * llm.args.n_layers and prefilled == []
    for _ in s:
        pass
    assert prefilled == [1] * llm.args.n_layers and len(profiled) == llm.args.n_layers


def test_plan_kinds_refuses_unknown_names():
    """A misspelt policy would otherwise be dropped by the byte floor and caught only by make_plan,
    after the load and the profile."""
    import torch
    from engine.planner import plan_kinds
    assert plan_kinds("auto", torch.device("cpu")) == ("evict", "offload")
    assert plan_kinds("auto", torch.device("cuda")) == ("quant", "evict", "offload")
    assert plan_kinds("quant,evict", torch.device("cpu")) == ("quant", "evict")
    with pytest.raises(ValueError, match=r"unknown plan policies \['ofload'\]"):
        plan_kinds("evict,ofload", torch.device("cpu"))


@pytest.mark.parametrize("mode", ["xkv", "uniform"])
def test_evict_only_plans_stay_within_a_budget_at_the_least_they_can_take(mode):
    """Every evict layer keeps its window (32) whatever --floor says: a floor of 8 once let a plan
    priced for 8 tokens per layer allocate 32 and go 2.5x over its budget, silently."""
    from engine.planner import check_kv_budget, make_plan
    from engine.layer_stats import LayerStats
    args = preset("tiny", vocab_size=300)
    prompt, new = 400, 8
    curve = [min(1.0, 4 * f) for f in FRACTIONS]  # concave: most of the mass in the first quarter
    stats = [LayerStats(0.5, curve, [0.0] * len(FRACTIONS), [0.0] * len(FRACTIONS), {}) for _ in range(args.n_layers)]
    least = (32 + new) * args.kv_bytes_per_token(4)
    with pytest.raises(ValueError, match=f"below the least {'an xkv' if mode == 'xkv' else 'a uniform'} plan"):
        check_kv_budget(args, least - 1, prompt, new, 4, mode, (), floor=8)
    budget = check_kv_budget(args, least, prompt, new, 4, mode, (), floor=8)
    plan = make_plan(args, stats, prompt, new, 4, budget, mode, floor=8)
    assert sum(o.device_bytes for o in plan) <= budget
    if mode == "uniform":  # 50 tokens a layer: each layer's budget, its quality the curve at 50 / 400 = 1 / 8
        plan = make_plan(args, stats, prompt, new, 4, (50 + new) * args.kv_bytes_per_token(4), mode, floor=8)
        assert [(o.spec["budget"], o.quality) for o in plan] == [(50, 0.5)] * args.n_layers


def test_kv_budget_syntax():
    """Bytes (with a unit, or a whole number above 1), or a fraction of FullKV (0.2, 20%; 1 and 100%
    are FullKV itself)."""
    from engine.planner import parse_kv_budget
    full = 10_000
    for text, want in [("0.2", 2000), ("20%", 2000), ("1", full), ("1.0", full), ("100%", full),
                       ("2048", 2048), ("512MiB", 512 << 20), ("1.5 GiB", 3 << 29)]:
        assert parse_kv_budget(text, full) == want, text
    for text, why in [("150%", "more than FullKV"), ("2.0", "at most 1"), ("0", "positive"), ("-0.2", "positive"),
                      ("infGiB", "positive and finite"), ("lots", "not a KV budget")]:
        with pytest.raises(ValueError, match=why):
            parse_kv_budget(text, full)


def test_a_prompt_too_short_to_quantize_leaves_quant_uncalibrated():
    """A prompt shorter than QuantKV's full-precision window keeps every token exact: its errors and
    KL are rounding noise (the KL even below 0), and their ratio once priced every bit width above
    FullKV (quality 1.0007) and planned QuantKV where FullKV fit. Noise is no calibration (None)."""
    from engine.api import LLM
    llm = LLM("random:tiny")
    ids = [random.Random(0).randrange(100, 1000) for _ in range(33)]
    plan = llm.plan(ids, kv_budget="1MiB", new_tokens=8, kinds="quant,evict,offload")
    assert all(plan.stats[0].harm[f"quant{b}"] is None for b in (1, 2, 4))
    assert [o.spec["policy"] for o in plan.layers] == ["full"] * llm.args.n_layers
    assert all(o.quality <= 1.0 for o in plan.layers)
