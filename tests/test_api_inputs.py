"""The API refuses bad input with one ValueError line before any work (weights aside), as the CLIs
print it: misspelt options, values of the wrong type, budgets no plan can meet (each prompt of a
batch, before the first is profiled), and sampling values that would fail mid-generation."""
import math
import re

import numpy as np
import pytest

from engine.api import LLM
from engine.runner import fit_prompt

pytestmark = pytest.mark.usefixtures("reuse_models")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", dtype="float32")


@pytest.fixture
def no_profiling(monkeypatch):
    """Fails a test that profiles: its input had to be refused before."""
    import engine.api
    monkeypatch.setattr(engine.api, "profile_prompt", lambda *a, **kw: pytest.fail("profiled before refusing"))


@pytest.mark.parametrize("options, fragment", [
    ({"temprature": 1.5}, "unknown option 'temprature'"),  # once silently greedy
    ({"max_tokens": 2}, "unknown option 'max_tokens'"),
    ({"policy": "hybrid", "kind": "evict"}, "unknown option 'kind'"),  # once a TypeError from plan()
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": math.inf}, "temperature must be a finite number >= 0"),
    ({"temperature": "0.5"}, "temperature must be a finite number >= 0"),
    ({"temperature": None}, "temperature must be a finite number >= 0"),
    ({"top_k": 2.5}, "top-k must be an int >= 0"),
    ({"top_p": float("nan")}, "top-p must be in (0, 1]"),
    ({"top_p": 0.0}, "top-p must be in (0, 1]"),  # would drop every token: NaN probabilities mid-generation
    ({"seed": 1.5}, "seed must be an int in [-2**63, 2**64)"),
    ({"seed": 2**64}, "seed must be an int in [-2**63, 2**64)"),
    ({"ctx": 0}, "ctx must be an int >= 1"),  # 0 once meant "no cap"
    ({"ctx": -1}, "ctx must be an int >= 1"),  # once blamed max_new_tokens
    ({"ctx": "4k"}, "ctx must be an int >= 1"),
    ({"ctx": True}, "ctx must be an int >= 1"),
    ({"max_new_tokens": 8192}, "max_new_tokens 8192 leaves no room in"),  # the whole 8192-token context
    ({"prefill_chunk": "4"}, "prefill_chunk must be an int >= 1"),
    ({"prefill_chunk": 1.5}, "prefill_chunk must be an int >= 1"),
    ({"max_new_tokens": True}, "max_new_tokens must be ints >= 0"),
    ({"policy": [1] * 30}, "per-layer specs are strings or dicts"),
    ({"policy": "bogus:x=1"}, "unknown KV policy 'bogus'; choose from full, quant, offload, evict, hybrid or plan:PATH"),
])
def test_bad_options_are_one_value_error(llm, no_profiling, options, fragment):
    with pytest.raises(ValueError) as e:
        llm.generate(PROMPT, **{"max_new_tokens": 2, **options})
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("prompt, fragment", [
    (None, "a prompt is text or a list of token ids, not NoneType"),
    (5, "a prompt is text or a list of token ids, not int"),
    ([None], "a prompt is text or a list of token ids, not NoneType"),  # a batch of one bad prompt
    ([1.0, 5], "prompt 0: a prompt is text or a list of token ids, not float"),  # a batch: floats are no ids
    ([True, 5], "token ids must be ints"),
    ([5, 49152], "token ids must be ints in [0, 49152)"),  # the vocabulary's size is one past its last id
    ([-1, 5], "token ids must be ints in [0, 49152)"),
])
def test_bad_prompts_are_one_value_error(llm, prompt, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        llm.generate(prompt, max_new_tokens=2)


def test_negative_seeds_are_seeds(llm):
    """torch's manual_seed takes [-2**63, 2**64): a negative seed samples as before the checks."""
    a = llm.generate(PROMPT, max_new_tokens=3, temperature=0.8, seed=-1).token_ids
    assert a == llm.generate(PROMPT, max_new_tokens=3, temperature=0.8, seed=-1).token_ids


def test_numpy_token_ids_are_token_ids(llm):
    """A list of numpy ints is one prompt of token ids (it was taken for a batch of prompts)."""
    ids = llm.encode(PROMPT)
    out = llm.generate([np.int64(t) for t in ids], max_new_tokens=4)
    assert out.token_ids == llm.generate(ids, max_new_tokens=4).token_ids


def test_a_tiny_temperature_samples_the_greedy_token(llm):
    """logits / 1e-38 overflowed to inf and softmax gave NaN: torch.multinomial failed mid-generation."""
    greedy = llm.generate(PROMPT, max_new_tokens=6).token_ids
    assert llm.generate(PROMPT, max_new_tokens=6, temperature=1e-38, seed=3).token_ids == greedy


def test_a_hybrid_batch_checks_every_budget_before_profiling_any_prompt(llm, no_profiling):
    long = "The quick brown fox jumps over the lazy dog. " * 80
    with pytest.raises(ValueError, match=r"^prompt 1: KV budget .* is below the least a plan for 2 tokens"):
        llm.generate([long, "hi there"], max_new_tokens=4, policy="hybrid", kv_budget=0.2)


@pytest.mark.parametrize("options, fragment", [
    ({"mode": "bogus"}, "unknown plan mode 'bogus'"),
    ({"mode": "xkv-tau"}, "mode xkv-tau needs tau"),
    ({"mode": "xkv-tau", "tau": 5}, "mode xkv-tau needs tau"),  # once accepted: the plan kept every token
    ({"mode": "xkv", "kv_budget": "200KiB"}, "is below the least an xkv plan"),  # once after profiling
    ({"mode": "uniform", "kv_budget": "200KiB"}, "is below the least a uniform plan"),  # once 16x over, silently
])
def test_plan_options_are_checked_before_profiling(llm, no_profiling, options, fragment):
    long = "The quick brown fox jumps over the lazy dog. " * 80
    with pytest.raises(ValueError, match=fragment):
        llm.plan(long, **options)


def test_full_kv_bytes_is_what_fullkv_holds_when_a_run_ends_early(llm, monkeypatch):
    """Caches are allocated for prompt + max_new_tokens; a run that ends at an end-of-turn token
    still holds that, and FullKV's own cache is the yardstick (it once counted only the tokens made)."""
    first = llm.generate(PROMPT, max_new_tokens=1).token_ids[0]
    monkeypatch.setattr(llm.tokenizer, "eos_ids", {first})
    out = llm.generate(PROMPT, max_new_tokens=8)
    assert out.stop_reason == "eos" and len(out.token_ids) == 1
    assert out.kv_bytes["device"] == out.full_kv_bytes == llm.full_kv_bytes(out.prompt_tokens + 8)


def test_defaults_and_edges_of_generate(llm):
    """What a call without options means: a raw prompt (no chat template), its text as text; the
    end-of-turn token ends the text without being shown, streamed or not; and the edges of the
    accepted ranges: no new tokens at all, prefill one token at a time."""
    assert llm.encode(PROMPT) == llm.tokenizer.encode(PROMPT, allow_special=False)
    assert llm.tokenizer.specials["<|im_end|>"] not in llm.encode("a<|im_end|>")
    none = llm.generate(PROMPT, max_new_tokens=0)
    assert none.token_ids == [] and none.text == "" and none.prompt_tokens == len(llm.encode(PROMPT))
    one = llm.generate(PROMPT, max_new_tokens=1)
    assert llm.generate(PROMPT, max_new_tokens=1, prefill_chunk=1).token_ids == one.token_ids
    stream = llm.stream("Say hi.", chat=True, max_new_tokens=40)
    pieces = list(stream)
    out = stream.output
    assert out.stop_reason == "eos" and out.token_ids[-1] in llm.tokenizer.eos_ids
    assert "".join(pieces) == out.text == llm.tokenizer.decode(out.token_ids[:-1]) and "<|im_end|>" not in out.text
    assert llm.generate(PROMPT, max_new_tokens=1, ctx=1).prompt_tokens == 1  # the smallest ctx: the last token
    assert llm.generate([0, 49151], max_new_tokens=1).prompt_tokens == 2  # the first and the last id


def test_a_prompt_past_its_room_loses_its_middle():
    """The start (instructions) and the end (the question) are kept; an odd room gives the end one more."""
    ids = list(range(10))
    assert fit_prompt(ids, 10) == (ids, 0) and fit_prompt(ids, 11) == (ids, 0)
    assert fit_prompt(ids, 4) == ([0, 1, 8, 9], 6)
    assert fit_prompt(ids, 5) == ([0, 1, 7, 8, 9], 5)
    assert fit_prompt(ids, 1) == ([9], 9)
