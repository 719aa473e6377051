"""The profile prices each option by what the policy really does: the attention-output error of the
decode queries under the tokens BudgetedEvictKV keeps / OffloadKV fetches (chunks and all), and a
calibration that is the KL of the model's own outputs with every layer on one option."""
import json
import math

import pytest
import torch

from engine.calibrate import kl_divergence
from engine.config import preset
from engine.kv.evict import BudgetedEvictKV
from engine.kv.offload import OffloadKV
from engine.planner import harm_weights, layer_options, plan_hybrid
from engine.layer_stats import FRACTIONS, LayerStats, average, stats_from_json, stats_to_json
from engine.profile import CAL, ProfileConfig, calibration_specs, layer_stats, profile_prompt
from engine.runner import generate
from engine.sampling import SamplingParams
from stepping import attend_next, decode_logits

ARGS = preset("tiny", vocab_size=300, n_heads=4, n_kv_heads=2, dim=128, n_layers=1)  # head_dim 32


def _case(seed, T, D):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(1, 2, T + 1, D, generator=g), torch.randn(1, 2, T + 1, D, generator=g)
    k[:, :, 90:94] *= 3  # a few tokens that stand out, as a needle would
    q_prompt, q_dec = torch.randn(1, 4, 32, D, generator=g), torch.randn(1, 4, 1, D, generator=g)
    exact = ((q_dec.reshape(1, 2, 2, D) @ k.transpose(-1, -2)) / math.sqrt(D)).softmax(-1) @ v
    return k, v, q_prompt, q_dec, exact.reshape(1, 4, 1, D)  # heads in the queries' order


def _err(out, exact):
    return ((out - exact).norm(dim=-1) / exact.norm(dim=-1)).mean().item()


@pytest.mark.parametrize("chunk, host", [(1, "8bit"), (4, "8bit"), (1, "model")])
def test_offload_error_is_the_policys(chunk, host):
    T, D = 203, ARGS.head_dim
    k, v, q_prompt, q_dec, exact = _case(chunk, T, D)
    params = {"sink": 4, "recent": 8, "channels": 8, "chunk": chunk, "host": host}
    stats = layer_stats(k, v, T, q_prompt, q_dec, ARGS, ProfileConfig(offload=params))
    for i in (8, 16, 24):  # budgets of 1/8, 1/4, 3/8 of the prompt
        p = OffloadKV(ARGS, 0, T + 1, "cpu", torch.float32, budget=round(FRACTIONS[i] * T), **params)
        p.prefill(k[:, :, :T], v[:, :, :T], q_prompt)
        out = attend_next(p, q_dec, k[:, :, T:], v[:, :, T:])
        assert 0 < p.top < p.M  # something offloaded, something fetched
        assert stats.offload_err[i] == pytest.approx(_err(out, exact), abs=1e-5), i
    assert stats.offload_err[-1] == 0.0 and stats.offload_err[1] == 1.0  # all kept / below sink + recent


def test_evict_error_and_retention_are_the_policys():
    T, D = 203, ARGS.head_dim
    k, v, q_prompt, q_dec, exact = _case(5, T, D)
    cfg = ProfileConfig(evict={"window": 16, "pool": 5})
    stats = layer_stats(k, v, T, q_prompt, q_dec, ARGS, cfg)
    probs = ((q_dec.reshape(1, 2, 2, D) @ k.transpose(-1, -2)) / math.sqrt(D)).softmax(-1)  # (1, 2, 2, T + 1)
    for i in (8, 16, 40):
        p = BudgetedEvictKV(ARGS, 0, T + 1, "cpu", torch.float32, budget=round(FRACTIONS[i] * T), **cfg.evict)
        p.prefill(k[:, :, :T], v[:, :, :T], q_prompt[:, :, -p.q_window:])
        kept_k = p.k[:, :, :p.length].clone()
        out = attend_next(p, q_dec, k[:, :, T:], v[:, :, T:])
        assert stats.evict_err[i] == pytest.approx(_err(out, exact), abs=1e-5), i
        kept = (k[:, :, :T, None] == kept_k[:, :, None]).all(-1).any(-1)  # (1, 2, T): prompt tokens kept
        mass = (probs[..., :T] * kept[:, :, None]).sum(-1) + probs[..., T]
        assert stats.evict[i] == pytest.approx(mass.mean().item(), abs=1e-5), i


def test_calibration_is_the_kl_per_unit_of_error(default_model, monkeypatch):
    """harm[kind] = KL(FullKV || every layer on that option) over the probe's tokens, per unit of the
    layers' summed error: recomputed here by teacher forcing the same tokens through real policies.
    On a CPU the kinds run as one batch; one after another (a GPU's default) gives the same."""
    import engine.profile
    from engine.calibrate import calibrate
    m = default_model
    text = open(__file__).read() * 4
    ids = m.tokenizer.encode(text)[:1000]
    cfg = ProfileConfig(probe=4)
    seen = []
    monkeypatch.setattr(engine.profile, "calibrate", lambda *a: seen.append(a) or calibrate(*a))
    stats = profile_prompt(m.model, ids, cfg)
    assert calibrate(*seen[0], batch=False) == pytest.approx(stats[0].harm, rel=1e-3)
    harm = stats[0].harm
    assert set(harm) == {"quant1", "quant2", "quant4", "evict", "offload"}
    assert all(s.harm is harm for s in stats)
    probe = generate(m.model, ids, cfg.probe, SamplingParams(), {"policy": "full"}).generated_ids  # as profiled
    tokens = torch.tensor([ids + probe])
    full, _ = decode_logits(m.model, tokens, {"policy": "full"}, len(ids))
    for kind, (spec, at) in calibration_specs(len(ids), cfg).items():
        got, _ = decode_logits(m.model, tokens, spec, len(ids))
        kl = kl_divergence(full[1:, 0], got[1:, 0]).mean().item()
        assert at == (None if kind.startswith("quant") else CAL)  # 1000 tokens: every budget valid at CAL
        err = sum(s.quant_err[spec["bits"]] if at is None else getattr(s, kind + "_err")[at] for s in stats)
        assert harm[kind] == pytest.approx(kl / err, rel=1e-3), kind
        assert harm[kind] > 0


def test_planner_weighs_errors_by_their_harm():
    n = len(FRACTIONS)
    s = LayerStats(0.1, [0.9] * n, [0.1] * n, [0.2] * n, {1: 0.1, 2: 0.05, 4: 0.01},
                   harm={"evict": 0.01, "offload": 0.005, "quant1": 0.04, "quant2": 0.02, "quant4": 0.01})
    ref = (0.01 + 0.005) / 2  # evict and offload together are the reference
    w = harm_weights(s)
    assert w == pytest.approx({"evict": 1, "offload": 1, "quant1": 0.04 / ref, "quant2": 0.02 / ref,
                               "quant4": 0.01 / ref})
    q = {(o.spec["policy"], o.spec.get("bits")): o.quality
         for o in layer_options(ARGS, s, 1000, 0, 4, ProfileConfig(), 64, ("evict", "offload", "quant"))}
    assert q[("quant", 1)] == pytest.approx(1 - 0.04 / ref * 0.1)
    assert q[("quant", 2)] == pytest.approx(1 - 0.02 / ref * 0.05)
    assert q[("evict", None)] == pytest.approx(0.9) and q[("offload", None)] == pytest.approx(0.8)
    s.harm = None  # statistics without a calibration: errors priced alike
    assert set(harm_weights(s).values()) == {1.0}


def test_calibration_follows_the_kinds_and_short_prompts():
    """Only the kinds asked for are calibrated; a kind too long for the prompt is None; a plan with
    quant refuses statistics that did not calibrate it."""
    cfg = ProfileConfig(calibrate=("evict", "offload"))
    specs = calibration_specs(4096, cfg)
    assert set(specs) == {"evict", "offload"} and specs["evict"][1] == CAL
    short = calibration_specs(300, ProfileConfig())  # 9.4% = 28 tokens: below evict's window and offload's floor
    assert short["evict"][1] > CAL and round(FRACTIONS[short["evict"][1]] * 300) >= 32
    assert short["offload"] == (None, None) or round(FRACTIONS[short["offload"][1]] * 300) > 80
    assert calibration_specs(60, ProfileConfig())["offload"] == (None, None)
    n = len(FRACTIONS)
    stats = [LayerStats(0.1, [0.9] * n, [0.1] * n, [0.2] * n, {1: 0.1, 2: 0.05, 4: 0.01}, harm={})]
    with pytest.raises(ValueError, match="did not calibrate quant"):
        plan_hybrid(ARGS, stats, 1000, 0, 4, 10**9, kinds=("quant", "evict", "full"))
    assert plan_hybrid(ARGS, stats, 1000, 0, 4, 10**9, kinds=("evict", "offload", "full"))


def test_profiles_average_layer_by_layer_and_harm_over_the_profiles_that_measured_it():
    def stats(x, harm):
        return [LayerStats(x, [x, 2 * x], [1 - x, 0.5], [x / 2, 0.0], {1: x, 2: x / 4, 4: 0.0}, harm)]
    a, b = stats(0.2, {"evict": 1.0, "quant2": None}), stats(0.4, {"evict": 3.0, "quant2": 0.5})
    (m,) = average([a, b])
    assert [m.dense, *m.evict, *m.evict_err, *m.offload_err] == pytest.approx([0.3, 0.3, 0.6, 0.7, 0.5, 0.15, 0.0])
    assert m.quant_err == pytest.approx({1: 0.3, 2: 0.075, 4: 0.0})
    assert m.harm == {"evict": 2.0, "quant2": 0.5}  # one profile could not calibrate quant2: the other's
    assert average([a, stats(0.4, None)])[0].harm is None  # a profile without any calibration: none
    assert average([stats(0.4, None)] * 2)[0].harm is None
    assert average([stats(0.2, {"evict": None}), a])[0].harm == {"evict": 1.0, "quant2": None}


def test_layer_stats_json_round_trip_and_the_old_kept_mass_format():
    s = [LayerStats(0.25, [0.5, 1.0], [0.5, 0.0], [0.25, 0.0], {1: 0.3, 2: 0.1, 4: 0.02}, {"evict": 2.0})]
    rows = json.loads(json.dumps(stats_to_json(s)))  # bit widths come back from JSON as strings
    assert stats_from_json(rows) == s
    old = {"dense": 0.25, "evict": [0.5, 1.0], "offload": [0.75, 1.0], "quant_err": {"2": 0.1}}
    (r,) = stats_from_json([old])  # saved when the planner priced kept attention mass: error = 1 - mass
    assert (r.evict_err, r.offload_err, r.quant_err, r.harm) == ([0.5, 0.0], [0.25, 0.0], {2: 0.1}, None)
