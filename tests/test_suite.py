"""engine/eval/suite.py, bench.py --suite's loop, on the tiny preset (seconds; test_bench.py's suite
run on the default model takes minutes): which rows a task prompt gets (a fraction-free method once,
the hybrid profiled once per prompt and planned per fraction), agreement measured against FullKV's
answer even when FullKV was not asked for, the held KV as a share of FullKV's for ours and a peer,
what is saved and skipped, and the summary's means."""
import pytest

from engine.eval import suite
from engine.eval.cells import BenchConfig
from engine.eval.tasks import make_task


def test_rows_of_one_prompt(tiny_llm, monkeypatch):
    """full is added as the reference; evict gets a row per fraction, quant:bits=2 one; the hybrid
    is profiled once for both fractions; FullKV agrees with itself and holds FullKV's bytes."""
    profiles = []
    real = tiny_llm.profile
    monkeypatch.setattr(tiny_llm, "profile", lambda *a, **k: profiles.append(1) or real(*a, **k))
    results, saves, log = {"suite": []}, [], []
    suite.run_suite(tiny_llm, None, 300, ["niah-number"], 2, ["evict", "quant:bits=2", "hybrid"], [], [0.3, 0.6],
                    results, lambda: saves.append(len(results["suite"])), log.append)
    rows = results["suite"]
    assert [(r["policy"], r["fraction"], r["seed"]) for r in rows] == [
        (p, f, seed) for seed in (0, 1) for p, f in [("full", None), ("evict", 0.3), ("evict", 0.6),
                                                       ("quant:bits=2", None), ("hybrid", 0.3), ("hybrid", 0.6)]]
    assert profiles == [1, 1]  # once per prompt, not per fraction
    assert saves == [6, 12]   # after each task prompt
    tasks = [make_task("niah-number", tiny_llm.tokenizer, 300, seed=s) for s in (0, 1)]
    for r in rows:
        assert r["engine"] == "layerkv" and r["task"] == "niah-number" and r["ctx"] == 300
        assert r["score"] == tasks[r["seed"]].score(r["answer"])
        assert isinstance(r["agree"], bool)
    full = [r for r in rows if r["policy"] == "full"]
    assert all(r["agree"] and r["kv_ratio"] == 1.0 for r in full)
    ratio = {(r["policy"], r["fraction"]): r["kv_ratio"] for r in rows if r["seed"] == 0}
    assert ratio[("evict", 0.3)] < 0.4 < ratio[("evict", 0.6)] < 0.7
    assert ratio[("quant:bits=2", None)] < 0.6  # 2-bit, but its recent 128 tokens are kept unquantized
    assert ratio[("hybrid", 0.3)] <= 0.31
    assert log[0].startswith("  suite niah-number seed 0 @ 300: FullKV ") and ", 6 answers in " in log[0]


def test_agreement_is_against_fulls_answer(tiny_llm, monkeypatch):
    """A row agrees when its answer key equals FullKV's: faked answers, one the same key in other
    formatting, one different."""
    answers = {"full": " 4711093.\nThe", "evict": "4711093, and more", "quant": " 4711094"}
    monkeypatch.setattr(suite, "ours", lambda m, task, names, fractions, log: [
        suite._row("layerkv", n, None, task, answers[n], 1.0) for n in names])
    results = {"suite": []}
    suite.run_suite(tiny_llm, None, 300, ["niah-number"], 1, ["evict", "quant"], [], [0.5], results, lambda: None,
                    lambda _: None)
    assert [(r["policy"], r["agree"]) for r in results["suite"]] == [("full", True), ("evict", True), ("quant", False)]


def test_a_peer_once_or_per_fraction(tiny_llm, monkeypatch):
    """A peer whose memory does not follow the fraction runs once (its fraction None, asked at 1.0),
    a press once per fraction; its held bytes are a share of FullKV's for the prompt and the answer."""
    asked = []
    per_token = tiny_llm.args.kv_bytes_per_token(4)

    def greedy(hf, name, ids, fraction, new, eos):
        asked.append((name, fraction))
        return [5, 6], int(fraction * per_token * (len(ids) + new))
    monkeypatch.setattr(suite.peer_mod, "greedy", greedy)
    from engine.eval.hf_view import hf_view
    hf = hf_view(tiny_llm.model)
    task = make_task("niah-number", tiny_llm.tokenizer, 300)
    rows = suite.peer(hf, "hf-dynamic", tiny_llm.tokenizer, task, [0.2, 0.4]) + \
        suite.peer(hf, "kvpress-snapkv", tiny_llm.tokenizer, task, [0.2, 0.4])
    assert asked == [("hf-dynamic", 1.0), ("kvpress-snapkv", 0.2), ("kvpress-snapkv", 0.4)]
    assert [(r["engine"], r["policy"], r["fraction"]) for r in rows] == [
        ("transformers", "hf-dynamic", None), ("kvpress", "snapkv", 0.2), ("kvpress", "snapkv", 0.4)]
    assert [r["kv_ratio"] for r in rows] == pytest.approx([1.0, 0.2, 0.4], rel=1e-4)  # int() of the bytes
    assert rows[0]["answer"] == tiny_llm.tokenizer.decode([5, 6])


def test_the_answer_text_drops_the_token_that_stopped_it():
    class Tok:
        eos_ids = {1}

        def decode(self, ids):
            return ",".join(map(str, ids))
    assert suite._text(Tok(), [7, 8, 1]) == "7,8" and suite._text(Tok(), [7, 1, 8]) == "7,1,8"
    assert suite._text(Tok(), []) == ""


def test_our_specs_skips_a_hybrid_fraction_below_the_floor(tiny_llm):
    ids = list(range(100, 400))
    notes = []
    specs = suite.our_specs(tiny_llm, ["full", "hybrid", "evict:budget=64"], [0.01, 0.5], ids, 16, notes.append)
    assert [(n, f) for n, f, _ in specs] == [("full", None), ("hybrid", 0.5), ("evict:budget=64", None)]
    assert len(notes) == 1 and notes[0].startswith("  hybrid @ 0.01: no plan (")
    assert specs[0][2] == {"policy": "full"} and len(specs[1][2]) == tiny_llm.args.n_layers


def test_run_suite_all_notes_skipped_peers_and_fits_the_model(tiny_llm, monkeypatch):
    """A context past the model's window leaves 64 tokens for the answer; a peer that cannot run is
    named in the results, and no transformers view is built when no peer runs."""
    from dataclasses import replace
    monkeypatch.setattr(tiny_llm, "args", replace(tiny_llm.args, max_seq_len=364))
    monkeypatch.setattr(suite.peer_mod, "skip_reason", lambda p: "not installed here")
    seen = []
    monkeypatch.setattr(suite, "run_suite", lambda m, hf, n, tasks, seeds, names, peers, fractions, *rest:
                        seen.append((hf, n, tasks, seeds, names, peers, fractions)))
    cfg = BenchConfig(ctxs=[256, 1000], policies=["evict"], fractions=[0.5], seeds=2)
    results, log = {"meta": {}}, []
    suite.run_suite_all(tiny_llm, cfg, ["vt"], ["kvpress-snapkv"], results, lambda: None, log.append)
    assert results["meta"]["skipped_peers"] == {"kvpress-snapkv": "not installed here"}
    assert seen == [(None, 256, ["vt"], 2, ["evict"], [], [0.5]), (None, 300, ["vt"], 2, ["evict"], [], [0.5])]
    assert log[0] == "  kvpress-snapkv: skipped (not installed here)"
    assert log[1] == "suite at 256 tokens: 1 tasks x 2 seed(s), fractions [0.5]"


def test_summary_means_per_method_and_task():
    def row(policy, f, task, score, agree, kv, ctx=300):
        return {"ctx": ctx, "engine": "layerkv", "policy": policy, "fraction": f, "task": task, "score": score,
                "agree": agree, "kv_ratio": kv}
    rows = [row("evict", 0.2, "vt", 1.0, True, 0.2), row("evict", 0.2, "vt", 0.0, False, 0.3),
            row("evict", 0.2, "cwe", 0.25, True, 0.25), row("full", None, "vt", 1.0, True, 1.0),
            row("evict", 0.5, "vt", 1.0, True, 0.5), row("evict", 0.2, "vt", 1.0, True, 0.2, ctx=600)]
    out = suite.summary(rows)
    assert [(s["ctx"], s["policy"], s["fraction"], s["n"]) for s in out] == [
        (300, "evict", 0.2, 3), (300, "full", None, 1), (300, "evict", 0.5, 1), (600, "evict", 0.2, 1)]
    first = out[0]
    assert first["accuracy"] == pytest.approx(1.25 / 3) and first["agreement"] == pytest.approx(2 / 3)
    assert first["kv_ratio"] == pytest.approx(0.25) and first["by_task"] == {"vt": 0.5, "cwe": 0.25}
    assert list(first["by_task"]) == ["vt", "cwe"] and out[1]["by_task"] == {"vt": 1.0}
