"""engine/eval/cells.py, the pieces every bench.py cell is made of, in seconds: the prompt text and
its length, each policy's spec at a kept fraction, a failing cell's one-line reason, the median
decode step, the up-front fit check, and one real latency cell on the tiny preset."""
import random
from types import SimpleNamespace

import pytest

from engine.eval import cells
from engine.kv.evict import BudgetedEvictKV
from engine.kv.offload import OffloadKV


class Recorder:
    """A stand-in LLM that records what the harness asks of it."""

    def __init__(self, name="model", vocab=1000, max_seq_len=8192, text_ids=None):
        self.name, self.calls = name, []
        self.args = SimpleNamespace(vocab_size=vocab, max_seq_len=max_seq_len)
        self.tokenizer = SimpleNamespace(encode=lambda text: list(text_ids if text_ids is not None else range(len(text))))

    def policy_specs(self, *a, **k):
        self.calls.append(("policy_specs", a, k))
        return [{"policy": "full"}]

    def check_kv_fits(self, runs):
        self.calls.append(("check_kv_fits", runs))


def test_text_ids():
    """Random weights get seeded ids past the special tokens; a real model real text, repeated when
    shorter than asked."""
    m = Recorder("random:tiny", vocab=500)
    ids = cells.text_ids(m, 50)
    assert ids == cells.text_ids(m, 50) and len(ids) == 50 and all(100 <= i < 500 for i in ids)
    rng = random.Random(0)
    assert ids == [rng.randrange(100, 500) for _ in range(50)]
    assert cells.text_ids(Recorder(text_ids=[7, 8, 9]), 7) == [7, 8, 9, 7, 8, 9, 7]
    assert cells.text_ids(Recorder(text_ids=range(20)), 5) == [0, 1, 2, 3, 4]


def test_prompt_len_leaves_room_for_the_new_tokens():
    m = Recorder(max_seq_len=8192)
    assert cells.prompt_len(m, 4096, 64) == 4096
    assert cells.prompt_len(m, 8192, 64) == 8128 and cells.prompt_len(m, 8128, 64) == 8128
    assert cells.prompt_len(m, 32768, 8191) == 1 and cells.prompt_len(m, 32768, 9000) == 1


def test_policy_specs_at_a_fraction():
    m, ids = Recorder(), list(range(1000))
    window = BudgetedEvictKV.defaults()["window"]
    d = OffloadKV.defaults()
    assert cells.policy_specs("full", m, ids, 0.2, 8) == {"policy": "full"}
    assert cells.policy_specs("quant", m, ids, 0.01, 8) == {"policy": "quant", "bits": 4}
    assert cells.policy_specs("evict", m, ids, 0.2, 8) == {"policy": "evict", "budget": 200}
    assert cells.policy_specs("evict", m, ids, 0.001, 8) == {"policy": "evict", "budget": window}
    assert cells.policy_specs("offload", m, ids, 0.5, 8) == {"policy": "offload", "budget": 500}
    assert cells.policy_specs("offload", m, ids, 0.001, 8) == {"policy": "offload", "budget": d["sink"] + d["recent"]}
    assert m.calls == []
    cells.policy_specs("hybrid", m, ids, 0.3, 16)
    cells.policy_specs("evict:budget=64", m, ids, 0.3, 16)
    assert m.calls == [("policy_specs", ("hybrid", ids, 16), {"kv_budget": 0.3}),
                       ("policy_specs", ("evict:budget=64",), {})]
    with pytest.raises(ValueError, match="unknown policy 'magic'; choose from full, quant"):
        cells.policy_specs("magic", m, ids, 0.3, 16)


def test_guarded_keeps_a_status_and_reports_a_failure_in_one_line(monkeypatch, capsys):
    cpu, log = cells.torch.device("cpu"), []
    cell = {"engine": "layerkv", "policy": "evict", "ctx": 256}
    assert cells.guarded(dict(cell), cpu, lambda: {"x": 1}, log.append)["status"] == "ok"
    assert cells.guarded(dict(cell), cpu, lambda: {"status": "skipped", "reason": "r"}, log.append)["status"] == "skipped"

    def fail(e):
        def fn():
            raise e
        return fn
    out = cells.guarded(dict(cell), cpu, fail(ValueError("first line\nsecond line")), log.append)
    assert out["status"] == "error" and out["reason"] == "ValueError: first line"
    assert log == ["  layerkv evict @ 256: ValueError: first line"]
    assert cells.guarded(dict(cell), cpu, fail(KeyError()), log.append)["reason"] == "KeyError: KeyError"
    assert cells.guarded(dict(cell), cpu, fail(RuntimeError("  \n")), log.append)["reason"] == "RuntimeError: RuntimeError"
    assert len(cells.guarded(dict(cell), cpu, fail(RuntimeError("x" * 500)), log.append)["reason"]) == 300
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("BENCH_TRACEBACK", "1")  # the whole story, for whoever debugs a cell
    cells.guarded(dict(cell), cpu, fail(ValueError("deep")), log.append)
    assert "Traceback" in capsys.readouterr().err


def test_latency_fields_take_the_median_step():
    out = cells.latency_fields(1.5, [0.004, 0.001, 0.003, 0.002], {"device": 30, "host": 70}, 120, (99, "kind"))
    assert out == {"prefill_s": 1.5, "decode_ms_per_token": 3.0, "decode_steps": 4,
                   "kv_bytes": {"device": 30, "host": 70}, "full_kv_bytes": 120, "kv_ratio": 0.25,
                   "peak_memory_bytes": 99, "peak_memory_kind": "kind"}
    assert cells.latency_fields(0, [0.003, 0.001, 0.002], {"device": 1}, 1, (0, ""))["decode_ms_per_token"] == 2.0


def test_check_fits_checks_each_spec_alone():
    """Runs measured one after another must each fit, not all of them at once."""
    m = Recorder()
    layers = cells.check_fits(m, ["full", "evict"], 100, 8)
    assert layers == [[{"policy": "full"}], [{"policy": "full"}]]
    assert m.calls[2:] == [("check_kv_fits", [([{"policy": "full"}], 100, 8)])] * 2


def test_passkey_fields():
    assert cells.passkey_fields([True, False, True, True], list("abcd")) == {
        "passkey_found": 3, "passkey_trials": 4, "passkey_acc": 0.75, "passkey_answers": list("abcd")}


def test_a_latency_cell_on_the_tiny_preset(tiny_llm):
    cfg = cells.BenchConfig(ctxs=[64], policies=["evict"], fractions=[0.5], steps=3, warmup=2)
    ids = cells.text_ids(tiny_llm, 64)
    out = cells.latency_cell(tiny_llm, ids, [{"policy": "full"}, {"policy": "evict", "budget": 32}], cfg)
    assert out["decode_steps"] == 3 and out["layers"] == {"full": 1, "evict": 1} and out["cuda_graphs"] is False
    assert out["full_kv_bytes"] == tiny_llm.args.kv_bytes_per_token(4) * (64 + 6)
    assert 0.5 < out["kv_ratio"] < 1  # layer 0 holds all 70 tokens, layer 1 less
    assert out["peak_memory_kind"] in ("rss_peak_since_cell_start", "rss_peak_of_process")
    assert "peak_estimate_bytes" not in out  # the CUDA allocator's figures only on a GPU
    with pytest.raises(ValueError):  # the fit check refuses before any prefill
        cells.latency_cell(tiny_llm, ids, {"policy": "evict", "budget": 0}, cfg)
