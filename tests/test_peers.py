"""engine/eval/peers.py, how bench.py runs transformers' caches and kvpress presses, in seconds: the
peer names, why one cannot run, the press and cache each name builds (kvpress faked: it is not in the
test venv), the bytes a cache holds, and transformers' DynamicCache on the tiny preset's weights
timed and scored as our cells are: the same logits as our FullKV, so no KL."""
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch

from engine.eval import peers
from engine.eval.cells import BenchConfig, text_ids
from engine.eval.hf_view import hf_view
from engine.eval.quality import fidelity_with_reference


@pytest.fixture(scope="module")
def tiny(tiny_llm):
    return tiny_llm, hf_view(tiny_llm.model)


def test_expand_peers_keeps_order_and_drops_repeats():
    assert peers.expand_peers(["kvpress-tova", "transformers", "hf-dynamic", "none"]) == [
        "kvpress-tova", "hf-dynamic", "hf-quanto4", "hf-quanto2"]
    assert peers.expand_peers(["all"]) == peers.PEER_GROUPS["transformers"] + peers.PEER_GROUPS["kvpress"]
    with pytest.raises(ValueError, match="unknown peer 'kvpress-magic'"):
        peers.expand_peers(["kvpress-magic"])


def test_skip_reasons(monkeypatch):
    installed = {"transformers"}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: real(name) if name in installed else None)
    assert peers.skip_reason("hf-dynamic") is None
    assert peers.skip_reason("hf-quanto4").startswith("optimum-quanto not installed")
    assert peers.skip_reason("kvpress-snapkv").startswith("kvpress not installed")
    installed.clear()
    assert peers.skip_reason("hf-dynamic") == "transformers not installed"


class FakeKvpress:
    """What make_press needs of kvpress: press classes taking a compression ratio."""

    def __getattr__(self, name):
        return lambda *a, **k: (name, a, k)


def test_make_press_removes_the_share_not_kept(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", FakeKvpress())
    assert peers.make_press("hf-dynamic", 0.2) is None
    name, _, kw = peers.make_press("kvpress-snapkv", 0.25)
    assert name == "SnapKVPress" and kw == {"compression_ratio": 0.75}
    assert peers.make_press("kvpress-streamingllm", 0.5)[0] == "StreamingLLMPress"
    name, (inner,), _ = peers.make_press("kvpress-adakv", 0.25)  # AdaKV spreads SnapKV's scores over heads
    assert name == "AdaKVPress" and inner == ("SnapKVPress", (), {"compression_ratio": 0.75})


def test_make_cache_by_name(tiny, monkeypatch):
    import transformers
    _, hf = tiny
    assert type(peers.make_cache("hf-dynamic", hf)) is transformers.DynamicCache
    monkeypatch.setattr(transformers, "QuantizedCache", lambda **k: k)
    assert peers.make_cache("hf-quanto2", hf) == {"backend": "quanto", "config": hf.config, "nbits": 2}
    assert peers.make_cache("hf-quanto4", hf)["nbits"] == 4


def test_cache_bytes_counts_each_tensor_once_and_looks_inside_wrappers():
    class Packed:  # a quanto QTensor's shape of things: inner tensors named by __tensor_flatten__
        def __init__(self):
            self._data, self._scale = torch.zeros(10, dtype=torch.uint8), torch.zeros(2)

        def __tensor_flatten__(self):
            return ["_data", "_scale"], None
    assert peers.tensor_bytes(Packed()) == 10 + 8
    assert peers.tensor_bytes(torch.nn.Parameter(torch.zeros(3))) == 12
    k, v = torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.float16)
    layers = [SimpleNamespace(keys=k, values=v, is_initialized=True),
              SimpleNamespace(parts=[k, (v, k)], extra={"a": torch.zeros(1, dtype=torch.int8)}, n=5)]
    assert peers.cache_bytes(SimpleNamespace(layers=layers)) == 128 + 64 + 1  # k and v counted once


def test_with_cache_uses_the_argument_the_forward_has():
    class New:
        def forward(self, input_ids, cache=None):
            pass

    class Old:
        def forward(self, input_ids, past_key_values=None):
            pass
    assert peers.with_cache(New(), 1) == {"cache": 1} and peers.with_cache(Old(), 2) == {"past_key_values": 2}


def test_latency_cell_of_a_dynamic_cache(tiny):
    m, hf = tiny
    cfg = BenchConfig(ctxs=[64], policies=[], fractions=[0.5], steps=3, warmup=2)
    out = peers.latency_cell(hf, "hf-dynamic", text_ids(m, 64), 0.5, cfg)
    per_token = m.args.kv_bytes_per_token(4)
    assert out["decode_steps"] == 3 and out["full_kv_bytes"] == per_token * (64 + 6)
    assert out["kv_bytes"] == {"device": per_token * (64 + 5), "host": 0}  # the last token is not fed
    assert out["prefill_s"] > 0 and "note" not in out


def test_greedy_is_our_fullkv_greedy_and_stops_at_an_end_token(tiny, monkeypatch):
    """Token by token, each at its own position after the prompt (a shift of one barely moves a
    random model's greedy tokens: the positions are checked as given), transformers' full cache
    decodes our FullKV's greedy tokens; an end token ends the answer after itself."""
    from engine.eval.quality import greedy, shared_prefill
    m, hf = tiny
    ids = text_ids(m, 40)
    first, [policies] = shared_prefill(m.model, ids, [{"policy": "full"}], 12)
    ours = greedy(m.model, policies, first, len(ids), 12, set())
    fed, forward = [], peers.forward
    monkeypatch.setattr(peers, "forward", lambda hf, tokens, cache, pos: fed.append((list(tokens), pos)) or
                        forward(hf, tokens, cache, pos))
    assert peers.greedy(hf, "hf-dynamic", ids, 1.0, 12, set())[0] == ours and len(set(ours)) > 3
    assert fed == [([t], 40 + i) for i, t in enumerate(ours[:-1])]
    assert peers.greedy(hf, "hf-dynamic", ids, 1.0, 12, {ours[1]})[0] == ours[:2]


def test_quality_of_a_full_cache_against_our_fullkv(tiny):
    """Teacher-forced token by token, transformers' cache on our weights gives our FullKV's logits;
    the pass-key grid runs every seed and depth."""
    m, hf = tiny
    ids = text_ids(m, 80)
    prompt, cont = ids[:72], ids[72:]
    logits, cache = peers.teacher_forced(hf, "hf-dynamic", prompt, cont, 1.0)
    ref, _ = fidelity_with_reference(m.model, prompt, cont, [])
    assert logits.shape == (8, m.args.vocab_size) and (logits - ref).abs().max() < 1e-4
    assert peers.cache_bytes(cache) == m.args.kv_bytes_per_token(4) * (72 + 7)
    cfg = BenchConfig(ctxs=[72], policies=[], fractions=[1.0], depths=[0.3, 0.7], seeds=2)
    out = peers.quality_cell(hf, "hf-dynamic", m.tokenizer, {"prompt": prompt, "continuation": cont, "full_logits": ref},
                             1.0, cfg)
    assert out["passkey_trials"] == 4 and len(out["passkey_answers"]) == 4
    assert abs(out["kl"]) < 1e-6 and out["top1"] == 1 and out["h2d_bytes_per_token"] == 0.0
