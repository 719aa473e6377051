"""Hybrid end to end on the default model: profile a 2k-token pass-key prompt, plan at 10% of
FullKV, generate, and find the key with the device KV inside the budget."""
from engine.eval.haystack import make_haystack
from engine.planner import make_plan
from engine.profile import profile_prompt
from engine.runner import generate
from engine.sampling import SamplingParams


def test_hybrid_retrieves_pass_key_at_2k_within_10_percent(default_model):
    m = default_model
    h = make_haystack(m.tokenizer, 2048, depth=0.5, seed=0)
    new = 8
    full = m.args.kv_bytes_per_token(4) * (len(h.ids) + new)
    budget = full // 10
    plan = make_plan(m.args, profile_prompt(m.model, h.ids), len(h.ids), new, 4, budget)
    assert sum(o.device_bytes for o in plan) <= budget
    assert len({o.spec["policy"] for o in plan}) >= 2  # a real mix, not one policy everywhere
    res = generate(m.model, h.ids, new, SamplingParams(), [o.spec for o in plan], m.tokenizer.eos_ids)
    assert res.kv_bytes()["device"] <= budget
    assert h.found(m.tokenizer.decode(res.generated_ids))
