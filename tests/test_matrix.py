"""engine/eval/matrix.py, the order bench.py measures in, on the tiny preset (seconds, where the
bench runs of test_bench.py take minutes): which cells a context gets and with which fraction, that
every finished cell is saved, which quality rows each kept fraction adds (a fraction-free method once),
that a latency cell's specs are reused for the first fraction's quality, and what one failing cell
or quality pass leaves standing.

The tiny preset has random weights, for which bench.py skips quality; renamed, it stands in for a
real model (its quality numbers mean nothing, but every one of them is computed)."""
from dataclasses import replace

import pytest

from engine.eval import cells, matrix
from engine.eval import peers as peer_mod
from engine.eval.cells import BenchConfig

POLICIES = ["full", "quant", "evict", "offload", "hybrid"]
CFG = BenchConfig(ctxs=[256], policies=POLICIES, fractions=[0.3, 0.5], steps=2, warmup=1, depths=[0.5],
                  seeds=1, continuation=6, warm_up=False)  # 6 teacher-forced tokens > 4 decoded


@pytest.fixture(scope="module")
def tiny(tiny_llm):
    tiny_llm.name = "tiny-as-if-real"  # quality runs (random: weights skip it)
    return tiny_llm


def fake_peer_latency(cfg: BenchConfig) -> dict:
    """A peer's latency cell without the peer (kvpress is not in the test venv)."""
    return cells.latency_fields(0.1, [0.01] * cfg.steps, {"device": 1, "host": 0}, 2, (3, "test"))


def run(m, cfg: BenchConfig, peers: list[str]) -> tuple[dict, list[int], list[str]]:
    """-> (results, how many cells each save() saw, log lines)."""
    results = {"meta": {}, "cells": [], "sweep": [], "suite": [], "throughput": []}
    saves, log = [], []
    matrix.run_matrix(m, cfg, peers, results, lambda: saves.append(len(results["cells"])), log.append)
    return results, saves, log


@pytest.fixture(scope="module")
def full_run(tiny):
    """Every policy at two fractions, one peer that runs and two that are not installed here (if
    the peers' venv has them, they are marked skipped all the same: the test is about the order)."""
    with pytest.MonkeyPatch.context() as mp:
        real_skip = peer_mod.skip_reason
        mp.setattr(peer_mod, "skip_reason", lambda p: real_skip(p) if p == "hf-dynamic" else "not here")
        specs_asked = []
        real_specs = cells.policy_specs

        def spy(name, m, ids, fraction, new):
            specs_asked.append((name, fraction, len(ids), new))
            return real_specs(name, m, ids, fraction, new)
        mp.setattr(cells, "policy_specs", spy)
        results, saves, log = run(tiny, CFG, ["hf-dynamic", "hf-quanto4", "kvpress-snapkv"])
    return results, saves, log, specs_asked


def test_cells_in_order_with_their_fraction(full_run):
    results, saves, _, _ = full_run
    got = [(c["engine"], c["policy"], c["fraction"], c["status"]) for c in results["cells"]]
    assert got == [("layerkv", "full", None, "ok"), ("layerkv", "quant", None, "ok"),
                   ("layerkv", "evict", 0.3, "ok"), ("layerkv", "offload", 0.3, "ok"),
                   ("layerkv", "hybrid", 0.3, "ok"), ("transformers", "hf-dynamic", None, "ok"),
                   ("transformers", "hf-quanto4", None, "skipped"), ("kvpress", "snapkv", 0.3, "skipped")]
    for c in results["cells"]:
        assert c["ctx"] == 256 and c["prompt_tokens"] == 256
        if c["status"] == "ok":  # the first token, one untimed step, two timed
            assert c["decode_steps"] == 2 and c["decode_ms_per_token"] > 0
        else:
            assert c["reason"] == "not here" and c["quality"] is None
    hybrid = results["cells"][4]
    assert hybrid["plan_s"] > 0 and hybrid["plan_peak_memory_bytes"] > 0
    assert all("plan_s" not in c for c in results["cells"][:4])
    # saved after every cell (each save sees one more), then after each fraction's quality
    assert saves == [1, 2, 3, 4, 5, 6, 7, 8, 8, 8]


def test_quality_rows_per_fraction(full_run):
    """The first fraction measures everything that runs; the second only what its fraction changes.
    A cell's own quality is its first-fraction row."""
    results, _, _, _ = full_run
    sweep = [(r["engine"], r["policy"], r["fraction"]) for r in results["sweep"]]
    assert sweep == [("layerkv", p, 0.3) for p in POLICIES] + [("transformers", "hf-dynamic", 0.3)] + [
        ("layerkv", p, 0.5) for p in ("evict", "offload", "hybrid")]
    by = {(r["policy"], r["fraction"]): r["quality"] for r in results["sweep"]}
    cell = {c["policy"]: c for c in results["cells"]}
    for p in POLICIES + ["hf-dynamic"]:
        assert cell[p]["quality"] is by[(p, 0.3)]
        assert {"kl", "top1", "ppl", "passkey_trials"} <= set(by[(p, 0.3)])
    assert by[("full", 0.3)]["kl"] == 0 and by[("full", 0.3)]["top1"] == 1
    assert abs(by[("hf-dynamic", 0.3)]["kl"]) < 1e-4  # transformers' full cache on the same weights
    assert by[("evict", 0.5)] is not by[("evict", 0.3)]


def test_specs_are_built_once_per_fraction(full_run):
    """The latency cells' specs serve the first fraction's quality (a hybrid plan is a profiling
    pass: not made twice); the second fraction builds its own. Each is made for the longer of the
    decoded tokens (4) and the teacher-forced ones (6), one spec serving both; a hybrid's haystacks
    are planned each from its own prompt (256 tokens too, but made apart) for the 8 tokens they decode."""
    _, _, _, asked = full_run
    assert asked == [(p, 0.3, 256, 6) for p in POLICIES] + [
        ("hybrid", 0.3, 256, 8), ("evict", 0.5, 256, 6), ("offload", 0.5, 256, 6), ("hybrid", 0.5, 256, 6),
        ("hybrid", 0.5, 256, 8)]


def test_random_weights_skip_quality_with_a_note(tiny, monkeypatch):
    m = tiny
    monkeypatch.setattr(m, "name", "random:tiny")
    results, saves, log = run(m, replace(CFG, policies=["full", "evict"]), [])
    assert results["sweep"] == [] and all(c["quality"] is None for c in results["cells"])
    assert "random weights" in results["meta"]["quality_note"]
    assert saves == [1, 2] and not any("quality" in line for line in log)
    results, _, _ = run(m, replace(CFG, policies=["full"], quality=False), [])
    assert "quality_note" not in results["meta"]  # asked not to measure: nothing to explain


def test_a_failing_cell_is_a_row_and_the_rest_goes_on(tiny, monkeypatch):
    real = cells.latency_cell

    def latency(m, ids, specs, cfg):
        if specs.get("policy") == "evict":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\n(the rest of the message)")
        return real(m, ids, specs, cfg)
    monkeypatch.setattr(cells, "latency_cell", latency)
    results, saves, log = run(tiny, replace(CFG, policies=["full", "evict", "offload"], fractions=[0.3]), [])
    status = {c["policy"]: (c["status"], c.get("reason")) for c in results["cells"]}
    assert status == {"full": ("ok", None), "offload": ("ok", None),
                      "evict": ("error", "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB")}
    assert "  layerkv evict @ 256: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB" in log
    # its quality is still measured: a latency OOM says nothing about the teacher-forced pass
    assert "kl" in results["cells"][1]["quality"] and saves == [1, 2, 3, 3]


def test_a_failed_quality_pass_marks_ours_and_skips_the_peers(tiny, monkeypatch):
    """Without our FullKV reference no peer can be compared: their quality stays unmeasured."""
    def broken(*a, **k):
        raise MemoryError()
    monkeypatch.setattr(cells, "quality_cells", broken)
    results, _, _ = run(tiny, replace(CFG, policies=["full", "evict"], fractions=[0.3]), ["hf-dynamic"])
    assert [r["quality"] for r in results["sweep"]] == [{"error": "MemoryError: MemoryError"}] * 2
    assert results["cells"][2]["status"] == "ok" and results["cells"][2]["quality"] is None


def test_peer_quality_per_fraction_and_its_failure(tiny, monkeypatch):
    """A fraction-dependent peer (a kvpress press, faked: kvpress is not in the test venv) is measured
    at every fraction, a fraction-free one at the first only; a peer's failed quality is its row."""
    monkeypatch.setattr(peer_mod, "skip_reason", lambda p: None)
    asked = []

    def latency(hf, peer, ids, fraction, cfg):
        asked.append(("latency", peer, fraction))
        return fake_peer_latency(cfg)

    def quality(hf, peer, tok, ref, fraction, cfg):
        asked.append(("quality", peer, fraction))
        assert len(ref["prompt"]) == 256 and len(ref["continuation"]) == 6 and ref["full_logits"].shape[0] == 6
        if fraction == 0.5:
            raise ValueError("press refused")
        return {"passkey_found": 1, "passkey_trials": 1, "kl": 0.5}
    monkeypatch.setattr(peer_mod, "latency_cell", latency)
    monkeypatch.setattr(peer_mod, "quality_cell", quality)
    results, _, log = run(tiny, replace(CFG, policies=["full"]), ["hf-dynamic", "kvpress-snapkv"])
    assert asked == [("latency", "hf-dynamic", 0.3), ("latency", "kvpress-snapkv", 0.3),
                     ("quality", "hf-dynamic", 0.3), ("quality", "kvpress-snapkv", 0.3),
                     ("quality", "kvpress-snapkv", 0.5)]
    sweep = {(r["policy"], r["fraction"]): r["quality"] for r in results["sweep"]}
    assert sweep[("snapkv", 0.5)] == {"error": "ValueError: press refused"}
    assert results["cells"][2]["quality"] == {"passkey_found": 1, "passkey_trials": 1, "kl": 0.5}
    assert "  quality kvpress-snapkv @ 0.3: pass key 1/1, KL 0.5000" in log


def test_warm_up_runs_everything_once_unreported(tiny, monkeypatch):
    """Short runs at half the prompt or more (a 10% plan of 256 tokens is refused), two steps each,
    before the first cell, and each peer that can run; nothing of them lands in the results."""
    seen = []
    real_latency, real_specs = cells.latency_cell, cells.policy_specs
    monkeypatch.setattr(cells, "latency_cell", lambda m, ids, specs, cfg: (
        seen.append(("run", len(ids), cfg.steps, cfg.warmup)) or real_latency(m, ids, specs, cfg)))
    monkeypatch.setattr(cells, "policy_specs", lambda name, m, ids, f, new: (
        seen.append((name, f)) or real_specs(name, m, ids, f, new)))
    monkeypatch.setattr(peer_mod, "skip_reason", lambda p: None if p == "hf-dynamic" else "not here")
    monkeypatch.setattr(peer_mod, "latency_cell", lambda hf, peer, ids, f, cfg: (
        seen.append((peer, f, cfg.steps)) or fake_peer_latency(cfg)))
    cfg = replace(CFG, policies=["evict", "offload"], fractions=[0.3, 0.7], quality=False, warm_up=True)
    results, saves, log = run(tiny, cfg, ["hf-dynamic", "kvpress-snapkv"])
    assert seen == [("evict", 0.5), ("run", 256, 2, 0), ("offload", 0.5), ("run", 256, 2, 0), ("hf-dynamic", 0.5, 2),
                    ("evict", 0.3), ("run", 256, 2, 1), ("offload", 0.3), ("run", 256, 2, 1), ("hf-dynamic", 0.3, 2)]
    assert len(results["cells"]) == 4 and saves == [1, 2, 3, 4]
    assert log[0].startswith("warm-up: every policy and peer once on 256 tokens")


def test_the_prompt_leaves_room_for_what_follows_it(tiny, monkeypatch):
    """A context past the model's window is cut to leave room for the longer of the decoded tokens
    and the teacher-forced continuation."""
    monkeypatch.setattr(tiny, "args", replace(tiny.args, max_seq_len=300))
    results, _, log = run(tiny, replace(CFG, ctxs=[512], policies=["full"], continuation=40), [])
    assert results["cells"][0]["prompt_tokens"] == 260 and results["cells"][0]["ctx"] == 512
    assert "context 512: 260-token prompt" in log
