"""bench.py: a --quick run's JSON has every field with sane values, and its table renders again
from the JSON; the transformers view of our weights computes our logits without copying them; a
dynamic cache's bytes; policy and peer names; bad input is one line."""
import dataclasses
import json
import sys

import pytest
import torch

import bench
from engine.cli import parse_policies
from engine.eval.hf_view import hf_view, shares_storage
from engine.eval.peers import cache_bytes, expand_peers, with_cache
from engine.kv import build_policies, parse_policy
from engine.model import Llama
from helpers import TINY, assert_clean_error, call, script


def test_quick_json_has_every_field(reuse_models, capsys, monkeypatch, tmp_path):
    """A --quick run on the default model (a random-weight preset would skip quality), in-process and
    as small as still gives every field: a 256-token context (at 30% kept: 20% would be below the
    hybrid planner's floor there), 16 decode steps (the least --steps takes) after no warm-up, 4
    teacher-forced tokens, only the peer transformers always has plus one that may be missing. Then
    the subprocess smoke test of bench.py: --render prints the same table from the JSON."""
    out = tmp_path / "quick.json"
    argv = ["--quick", "--ctx", "256", "--kv-fraction", "0.3", "--warmup", "0", "--continuation", "4",
            "--peers", "hf-dynamic,kvpress-snapkv", "--no-warmup", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])  # meta["command"] records the command line
    ran = call(bench.main, argv, capsys)
    assert ran.returncode == 0, ran.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {"command", "date", "device", "torch", "model", "fractions"} <= set(res["meta"])
    cells = {(c["engine"], c["policy"]): c for c in res["cells"]}
    assert {("layerkv", p) for p in ("full", "quant", "evict", "offload", "hybrid")} <= set(cells)
    for (engine, policy), c in cells.items():
        assert f"| {engine} | {policy} |" in ran.stdout  # every cell is a row of the table
        if c["status"] == "skipped":  # only a peer that is not installed may be skipped, with a reason
            assert engine == "kvpress" and c["reason"]
            continue
        assert c["status"] == "ok", c
        assert c["prefill_s"] > 0 and c["decode_ms_per_token"] > 0 and c["decode_steps"] >= 16
        assert 0 < c["kv_ratio"] <= 1 and c["kv_bytes"]["device"] > 0 and c["full_kv_bytes"] > 0
        assert c["peak_memory_bytes"] > 0
        q = c["quality"]
        assert 0 <= q["passkey_acc"] <= 1 and 0 <= q["top1"] <= 1 and q["kl"] >= -1e-6 and q["ppl"] >= 1
    full = cells[("layerkv", "full")]
    assert full["quality"]["kl"] == 0 and full["quality"]["top1"] == 1 and full["kv_ratio"] == 1
    assert cells[("layerkv", "evict")]["kv_ratio"] < 0.5  # 30% of the prompt + the decoded tokens
    hybrid = cells[("layerkv", "hybrid")]  # its profiling pass's peak apart from its run's
    assert hybrid["plan_s"] > 0 and hybrid["plan_peak_memory_bytes"] > 0
    # transformers on the same weights with its full cache agrees with our FullKV
    assert cells[("transformers", "hf-dynamic")]["quality"]["kl"] < 1e-4

    rendered = script("bench.py", "--render", str(out))
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert [ln for ln in rendered.stdout.splitlines() if ln.startswith("|")] == [
        ln for ln in ran.stdout.splitlines() if ln.startswith("|")]


def test_hf_view_matches_our_logits_without_copies():
    for tied in (True, False):
        args = dataclasses.replace(TINY, tie_embeddings=tied)
        model = Llama.random(args, "cpu", torch.float32, seed=3)
        with torch.no_grad():  # norms away from 1, so a swapped norm weight would show
            for layer in model.layers:
                layer.attn_norm.add_(0.1 * torch.randn_like(layer.attn_norm))
                layer.mlp_norm.add_(0.1 * torch.randn_like(layer.mlp_norm))
        hf = hf_view(model)
        assert shares_storage(hf, model)
        # 300 tokens: past the preset's 256-token original context, so llama3 rope scaling matters
        tokens = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = hf(tokens).logits
        ours = model.prefill(tokens, build_policies(args, {"policy": "full"}, 300, "cpu", torch.float32),
                             all_logits=True)
        assert (ours - ref).abs().max().item() <= 1e-4


def test_cache_bytes_counts_a_dynamic_cache():
    from transformers import DynamicCache
    hf = hf_view(Llama.random(TINY, "cpu", torch.float32))
    cache = DynamicCache()
    with torch.no_grad():
        hf(torch.arange(10, 50)[None], **with_cache(hf, cache), use_cache=True)
    assert cache_bytes(cache) == TINY.kv_bytes_per_token(4) * 40


def test_peer_greedy_counts_the_cache_after_its_decode():
    """The suite prices a peer's cache as ours: after the decode, decoded tokens included (it once
    read it after the prefill, which made a peer look smaller than our policy keeping the same)."""
    from engine.eval.peers import greedy
    hf = hf_view(Llama.random(TINY, "cpu", torch.float32))
    ids, held = greedy(hf, "hf-dynamic", list(range(10, 50)), 1.0, 6, set())
    assert len(ids) == 6 and held == TINY.kv_bytes_per_token(4) * (40 + 5)  # the last token is not fed


def test_parse_policy_and_peers():
    assert parse_policies("full,quant:bits=2,residual=128,plan:p.json") == [
        "full", "quant:bits=2,residual=128", "plan:p.json"]
    assert parse_policy("quant:bits=2,residual=128") == {"policy": "quant", "bits": 2, "residual": 128}
    assert parse_policy("evict:budget=64,evict_during_decode=1")["evict_during_decode"] is True
    with pytest.raises(ValueError, match="unknown KV policy"):
        parse_policy("magic")
    with pytest.raises(ValueError, match="not a whole number"):
        parse_policy("evict:budget=lots")
    assert expand_peers(["transformers"]) == ["hf-dynamic", "hf-quanto4", "hf-quanto2"]
    assert len(expand_peers(["all", "kvpress"])) == 9 and expand_peers(["none"]) == []
    with pytest.raises(ValueError, match="unknown peer"):
        expand_peers(["vllm"])


@pytest.mark.parametrize("argv, fragment", [
    (["--kv-fraction", "1.5"], "must be in (0, 1]"),
    (["--render", "docs/bench/cpu_smollm2.json", "--json", "x.json"], "--render measures nothing: --json"),  # was ignored
    (["--render", "docs/bench/cpu_smollm2.json", "--ctx", "8k"], "--render measures nothing: --ctx"),
    (["--render", "/nonexistent.json"], "--render /nonexistent.json: No such file"),
    (["--ctx", "abc"], "not a token count"),
    (["--steps", "4"], "--steps must be >= 16"),
    (["--policies", "full,magic"], "unknown policy"),
    (["--peers", "vllm"], "unknown peer"),
    (["--gpu-memory", "24"], "has no unit"),
    (["--gpu-memory=-3GiB"], "positive and finite"),
    (["--gpu-memory", "24GiB", "--device", "cpu", "--model", "random:tiny"], "caps a CUDA GPU"),
    (["--no-quality", "--seeds", "4"], "--seeds does nothing in a --no-quality run"),
    (["--no-quality", "--continuation", "64"], "--continuation does nothing in a --no-quality run"),
    (["--throughput", "--peers", "hf-dynamic"], "--peers does nothing in a --throughput run"),
    (["--throughput", "--depths", "0.5"], "--depths does nothing in a --throughput run"),
    (["--suite", "--continuation", "64"], "--continuation does nothing in a --suite run"),
    (["--suite", "--no-quality"], "--suite measures answers, which --no-quality turns off"),
    (["--suite", "--throughput", "--depths", "0.5"], "give --suite or --throughput, not both"),
    (["--model", "random:tiny", "--depths", "0.5"], "--depths does nothing in a run on random: weights"),
    (["--no-quality", "--kv-fraction", "0.1,0.2"], "--kv-fraction: a --no-quality run uses only the first"),
])
def test_bad_input_is_one_line(argv, fragment, capsys):
    assert_clean_error(call(bench.main, argv, capsys), fragment)


@pytest.mark.parametrize("policy, fragment", [
    ("quant:bits=3", "QuantKV bits must be 1, 2 or 4"),
    ("offload:channels=999", "channels must be in [1, head_dim"),
    ("plan:docs/plans/tailorkv_shape_random8b.json", "plan was made for model 'random:llama-3.1-8b'"),
])
def test_policy_values_are_refused_before_loading(policy, fragment, capsys):
    """A --policies piece whose values the model's shapes refuse stops the run before the weights load."""
    ran = call(bench.main, ["--model", "random:tiny", "--ctx", "256", "--policies", f"full,{policy}", "--peers",
                            "none", "--no-quality"], capsys)
    assert_clean_error(ran, fragment)
    assert "loaded" not in ran.stderr


def test_an_unusable_plots_directory_is_refused_before_loading(tmp_path, capsys):
    """--plots is written after the whole run: a file in its place is refused before the load."""
    (tmp_path / "afile").write_text("")
    for plots in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        ran = call(bench.main, ["--model", "random:tiny", "--ctx", "256", "--policies", "full", "--peers", "none",
                                "--no-quality", "--plots", str(plots)], capsys)
        assert_clean_error(ran, "is not a directory" if plots.name == "sub" else "not a directory")
        assert "loaded" not in ran.stderr


def test_suite_agreement_and_tables(reuse_models, capsys, monkeypatch, tmp_path):
    """bench.py --suite on two short tasks: FullKV agrees with itself; eviction whose budget covers
    the whole prompt (fraction 1.0) and transformers' full cache on the same weights give FullKV's
    answers; every row is scored; the tables render again from the JSON and the plot is written."""
    out = tmp_path / "suite.json"
    argv = ["--suite", "--ctx", "600", "--tasks", "niah-number,vt", "--kv-fraction", "0.3,1.0",
            "--policies", "full,evict,quant:bits=2", "--peers", "hf-dynamic", "--json", str(out),
            "--plots", str(tmp_path / "figs")]
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    ran = call(bench.main, argv, capsys)
    assert ran.returncode == 0, ran.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["suite"]
    got = {(r["engine"], r["policy"], r["fraction"], r["task"]) for r in rows}
    for task in ("niah-number", "vt"):
        assert {("layerkv", "full", None, task), ("layerkv", "evict", 0.3, task), ("layerkv", "evict", 1.0, task),
                ("layerkv", "quant:bits=2", None, task), ("transformers", "hf-dynamic", None, task)} == \
            {g for g in got if g[3] == task}
    for r in rows:
        assert 0 <= r["score"] <= 1 and isinstance(r["agree"], bool) and r["ctx"] == 600
        if (r["policy"] == "evict" and r["fraction"] == 1.0) or r["policy"] in ("full", "hf-dynamic"):
            assert r["agree"], r  # the same cache contents: the same greedy answer
        if r["policy"] == "full":
            assert r["kv_ratio"] == 1.0
        if r["policy"] == "evict":
            assert r["kv_ratio"] < 0.5 if r["fraction"] == 0.3 else r["kv_ratio"] > 0.9
    assert "agreement with FullKV's greedy answer" in ran.stdout and "| quant:bits=2 |" in ran.stdout
    assert (tmp_path / "figs" / "suite_600.png").stat().st_size > 10_000
    rendered = script("bench.py", "--render", str(out))
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert [ln for ln in rendered.stdout.splitlines() if ln.startswith("|")] == [
        ln for ln in ran.stdout.splitlines() if ln.startswith("|")]


@pytest.mark.parametrize("argv, fragment", [
    (["--suite", "--tasks", "niah-number,poetry"], "unknown task 'poetry'"),
    (["--tasks", "vt"], "--tasks goes with --suite"),
    (["--suite", "--model", "random:tiny"], "random: weights have none"),
])
def test_suite_bad_input_is_one_line(argv, fragment, capsys):
    assert_clean_error(call(bench.main, argv, capsys), fragment)


def test_pyramidkv_teacher_forced_with_uneven_layers():
    """kvpress's PyramidKV keeps a different number of tokens per layer once its pyramid is active
    (here 2700 tokens at 50%: its minimum layer budget clears its 64-token window); the teacher-forced
    pass must still run (bench.py at 8k failed here when it fed the continuation in one call)."""
    pytest.importorskip("kvpress")
    from engine.eval.peers import teacher_forced
    hf = hf_view(Llama.random(TINY, "cpu", torch.float32, seed=2))
    ids = torch.randint(0, 300, (2708,), generator=torch.Generator().manual_seed(0)).tolist()
    logits, cache = teacher_forced(hf, "kvpress-pyramidkv", ids[:2700], ids[2700:], 0.5)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert len(set(lengths)) > 1, lengths  # the pyramid is active: layers hold different lengths
    assert logits.shape == (8, hf.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("content", ['{"meta": {"command": "x"}, "cells": [{"engine": 1}]}', "[]", "{", "\"x\""])
def test_render_of_a_malformed_json_is_one_line(capsys, tmp_path, content):
    path = tmp_path / "run.json"
    path.write_text(content)
    assert_clean_error(call(bench.main, ["--render", str(path)], capsys), "not a bench.py --json file")


def test_suite_skips_a_hybrid_fraction_below_the_floor(reuse_models):
    """At 600 tokens with 16 new ones, 5% of FullKV is below every layer's cheapest option (64 tokens):
    no plan, a note, and the other fractions still planned."""
    from engine import LLM
    from engine.eval.suite import our_specs
    llm, notes = LLM(), []
    ids = llm.encode("The grass is green. " * 120)[:600]
    specs = our_specs(llm, ["hybrid"], [0.05, 0.5], ids, 16, notes.append)
    assert [(name, f) for name, f, _ in specs] == [("hybrid", 0.5)]
    assert len(notes) == 1 and "hybrid @ 0.05: no plan" in notes[0]


def test_throughput_batches_fill_the_memory_cap(reuse_models, capsys, tmp_path):
    """--throughput on a random preset: each policy's largest batch is the cap over its bytes per
    sequence (at most --max-batch), every batch size up to it decodes, the caches really hold what
    was priced, and a policy keeping fewer tokens fits more sequences in the same memory."""
    from engine.eval.throughput import batch_sizes
    assert batch_sizes(1) == [1] and batch_sizes(13) == [1, 2, 4, 8, 13] and batch_sizes(8) == [1, 2, 4, 8]
    out = tmp_path / "tp.json"
    ran = call(bench.main, ["--throughput", "--model", "random:tiny", "--ctx", "200", "--kv-memory", "200KiB",
                            "--policies", "full,evict:budget=40,offload:budget=40,sink=4,recent=8", "--max-batch", "6",
                            "--no-warmup", "--json", str(out), "--plots", str(tmp_path)], capsys)
    assert ran.returncode == 0, ran.stderr[-2000:]
    res = json.loads(out.read_text())
    cells = {c["policy"]: c for c in res["throughput"]}
    cap = res["meta"]["kv_memory_cap"]
    assert cap == 200 << 10
    for c in cells.values():
        assert c["status"] == "ok", c
        assert c["b_max"] == min(6, cap // c["kv_bytes_per_seq"])
        assert [r["batch"] for r in c["rows"]] == batch_sizes(c["b_max"])
        assert all(r["tokens_per_s"] > 0 for r in c["rows"])
        # held right after prefill: the prompt's tokens, less than the decoded room priced in
        assert 0.5 * c["b_max"] * c["kv_bytes_per_seq"] <= c["kv_bytes_held"] <= c["b_max"] * c["kv_bytes_per_seq"] <= cap
    assert cells["evict:budget=40"]["b_max"] > cells["full"]["b_max"] >= 1
    assert "| full | 200 |" in ran.stdout and "vs FullKV" in ran.stdout
    assert (tmp_path / "throughput_200.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, fragment", [
    (["--kv-memory", "1GiB"], "go with --throughput"), (["--throughput", "--kv-memory", "12"], "needs a unit"),
    (["--throughput", "--max-batch", "0"], "--max-batch must be >= 1"),
    (["--throughput", "--suite"], "not both"), (["--throughput", "--kv-memory=-1GiB"], "positive")])
def test_throughput_bad_input_is_one_line(argv, fragment, capsys):
    assert_clean_error(call(bench.main, argv, capsys), fragment)


def test_matrix_quality_survives_a_policy_that_cannot_plan(reuse_models, capsys, tmp_path):
    """At 5% of a 256-token prompt no hybrid plan fits: only the hybrid's rows say so (all of ours
    once carried its error, and the peers' rows were dropped). A name:key=value spec keeps what it
    says at any fraction: measured once, its cell's fraction None."""
    out = tmp_path / "m.json"
    argv = ["--ctx", "256", "--kv-fraction", "0.5,0.05", "--policies", "full,evict,hybrid,evict:budget=64",
            "--peers", "hf-dynamic", "--steps", "16", "--warmup", "0", "--no-warmup", "--continuation", "4",
            "--depths", "0.5", "--seeds", "1", "--json", str(out)]
    ran = call(bench.main, argv, capsys)
    assert ran.returncode == 0, ran.stderr[-2000:]
    res = json.loads(out.read_text())
    sweep = {(r["policy"], r["fraction"]): r["quality"] for r in res["sweep"]}
    assert "error" in sweep[("hybrid", 0.05)] and "error" not in sweep[("hybrid", 0.5)]
    assert "error" not in sweep[("evict", 0.05)] and "kl" in sweep[("evict", 0.05)]
    assert ("evict:budget=64", 0.5) in sweep and ("evict:budget=64", 0.05) not in sweep
    cells = {c["policy"]: c for c in res["cells"]}
    assert cells["evict:budget=64"]["fraction"] is None and cells["evict"]["fraction"] == 0.5
    assert ("hf-dynamic", 0.5) in sweep and "kl" in sweep[("hf-dynamic", 0.5)]


@pytest.mark.parametrize("argv, fractions", [
    (["--suite"], [0.05, 0.1, 0.2, 0.35, 0.5]),  # the suite's default draws curves
    (["--suite", "--kv-fraction", "0.2"], [0.2]),  # asked for: kept (it was taken for the default)
    ([], [0.2]),
])
def test_kv_fraction_default_and_asked(reuse_models, argv, fractions, capsys, monkeypatch):
    import engine.eval.matrix
    import engine.eval.suite
    seen = []
    capture = lambda m, cfg, *rest: seen.append(cfg.fractions)  # noqa: E731
    monkeypatch.setattr(engine.eval.suite, "run_suite_all", capture)
    monkeypatch.setattr(engine.eval.matrix, "run_matrix", capture)
    ran = call(bench.main, ["--ctx", "256", "--peers", "none", "--policies", "full", *argv], capsys)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert seen == [fractions]


def test_a_cell_that_cannot_fit_fails_before_its_prefill(reuse_models, capsys, monkeypatch, tmp_path):
    """bench.py ran a cell's prefill whatever its cache needed: on a CPU the OOM killer ended the
    whole bench (FullKV at 128k on an 8B model), on a GPU the error came after the prefill. Each of
    our cells now makes generate.py's up-front check: here FullKV cannot fit, evict at 25% can."""
    import engine.eval.cells
    import engine.fit
    out = tmp_path / "fit.json"
    from engine.config import preset
    args = preset("tiny")  # float32: FullKV of half the context and a whole prefill's peak are free
    free = args.kv_bytes_per_token(4) * 128 + args.prefill_bytes(256, 4)
    monkeypatch.setattr(engine.fit, "free_memory", lambda device: free)
    prefills = []
    real = engine.eval.cells.generate
    monkeypatch.setattr(engine.eval.cells, "generate", lambda *a, **k: prefills.append(a[3]) or real(*a, **k))
    ran = call(bench.main, ["--model", "random:tiny", "--ctx", "256", "--kv-fraction", "0.25", "--policies",
                            "full,evict", "--peers", "none", "--steps", "16", "--warmup", "0", "--no-warmup",
                            "--json", str(out)], capsys)
    assert ran.returncode == 0, ran.stderr[-2000:]
    cells = {c["policy"]: c for c in json.loads(out.read_text())["cells"]}
    assert cells["full"]["status"] == "error" and "the KV cache for " in cells["full"]["reason"]
    assert cells["evict"]["status"] == "ok"
    assert len(prefills) == 1  # evict's alone: FullKV's was refused before it
