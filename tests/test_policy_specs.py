"""Policy specs, as a command line writes them (parse_policy) and as a plan file holds them
(check_spec): every key and value type is checked against the policy's constructor, the one place
its defaults live, and refused in one line that names what is wrong."""
import re

import pytest

from engine.kv import check_spec, parse_policy


def test_a_command_line_policy_becomes_a_spec():
    assert parse_policy("full") == {"policy": "full"}
    assert parse_policy(" quant:bits=2, residual=128,") == {"policy": "quant", "bits": 2, "residual": 128}
    assert parse_policy("quant:heavy=0.02,rotate=v") == {"policy": "quant", "heavy": 0.02, "rotate": "v"}
    for word, switch in [("1", True), ("yes", True), ("True", True), ("0", False), ("no", False), ("false", False)]:
        assert parse_policy(f"evict:evict_during_decode={word}")["evict_during_decode"] is switch


@pytest.mark.parametrize("text, message", [
    ("magic", "unknown KV policy 'magic'; choose from full, quant, offload, evict"),
    ("evict:budget", "policy 'evict:budget': expected key=value, got 'budget'"),
    ("evict:frob=1", "evict has no parameter 'frob' (budget, window"),
    ("evict:budget=lots", "budget='lots' is not a whole number"),
    ("evict:budget=1.5", "budget='1.5' is not a whole number"),
    ("quant:heavy=lots", "heavy='lots' is not a number"),
    ("evict:evict_during_decode=maybe", "evict_during_decode='maybe' is not a yes/no value"),
])
def test_a_bad_command_line_policy_is_refused_in_one_line(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_policy(text)
    with pytest.raises(ValueError, match="evict, hybrid$" if text == "magic" else "^policy"):
        parse_policy(text, others="hybrid")


def test_plan_layers_are_checked_like_command_lines():
    check_spec({"policy": "quant", "bits": 4, "group": None, "heavy": 0}, "layer 3")  # None: "choose for me"
    check_spec({"policy": "offload", "lookahead": "layer", "budget": 2048}, "layer 3")
    for spec, message in [
        ({"policy": "quant", "bits": None}, "layer 3: quant bits=None is not a whole number"),
        ({"policy": "quant", "group": "x"}, "layer 3: quant group='x' is not a whole number"),
        ({"policy": "quant", "heavy": True}, "layer 3: quant heavy=True is not a number"),
        ({"policy": "evict", "budget": 2.0}, "layer 3: evict budget=2.0 is not a whole number"),
        ({"policy": "evict", "evict_during_decode": 1}, "evict_during_decode=1 is not true or false"),
        ({"policy": "full", "frob": 1}, "layer 3: full has no parameter 'frob'"),
        ({"policy": "magic"}, "layer 3: unknown KV policy 'magic'"),
        (["full"], "layer 3: a policy spec must be a dict, got list"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_spec(spec, "layer 3")
