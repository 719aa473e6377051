"""bench.py's tables from a result dict (engine/eval/report.py), on hand-made cells: what each kind of
cell prints (measured, skipped, failed with its quality standing, quality failed), and the suite's
agreement/accuracy table with its fixed column and the KV actually held where it is off the fraction.
Which plots a run draws. (End to end, from real runs: tests/test_bench.py.)"""
import os

from engine.eval.report import MiB, _ctx_label, plots, suite_tables, table


def _cells():
    q = {"passkey_found": 19, "passkey_trials": 20, "kl": 0.01234, "top1": 0.9876, "ppl": 9.8765}
    ok = {"engine": "layerkv", "policy": "full", "ctx": 4096, "prompt_tokens": 4000, "status": "ok",
          "prefill_s": 1.234, "decode_ms_per_token": 43.21, "kv_bytes": {"device": 3 * MiB, "host": MiB // 2},
          "kv_ratio": 0.5, "peak_memory_bytes": 600.4 * MiB, "quality": q}
    cells = [ok,
             {"engine": "kvpress", "policy": "snapkv", "ctx": 1000, "status": "skipped", "reason": "not installed"},
             {**ok, "policy": "evict", "status": "error", "reason": "OutOfMemoryError: x",
              "quality": {"kl": 0.5, "top1": 0.9, "ppl": 11.0}},
             {**ok, "policy": "quant", "quality": {"error": "ValueError: y"}}]
    return cells


def test_table_rows_for_each_kind_of_cell():
    head, rule, *rows = table({"cells": _cells()}).splitlines()
    assert head.count("|") == rule.count("|") == 15 and set(rule) == {"|", "-"}
    assert rows == [
        "| layerkv | full | 4k | 4000 | 1.23 | 43.2 | 3.0 | 0.5 | 0.500 | 600 | 19/20 | 0.0123 | 0.988 | 9.88 |",
        "| kvpress | snapkv | 1000 | – | skipped: not installed | | | | | | | | | |",
        "| layerkv | evict | 4k | 4000 | error: OutOfMemoryError: x | | | | | | – | 0.5000 | 0.900 | 11.00 |",
        "| layerkv | quant | 4k | 4000 | 1.23 | 43.2 | 3.0 | 0.5 | 0.500 | 600 | – | error | error | error |"]
    assert all(r.count("|") == 15 for r in rows)  # every row as wide as the header
    assert [_ctx_label(n) for n in (1024, 131072, 1000, 1536)] == ["1k", "128k", "1000", "1536"]


def _row(engine, policy, fraction, kv_ratio, task, score, agree):
    return {"ctx": 2048, "engine": engine, "policy": policy, "fraction": fraction, "kv_ratio": kv_ratio,
            "task": task, "score": score, "agree": agree}


def test_suite_table_shows_held_kv_only_where_it_is_off_the_fraction():
    rows = [_row("layerkv", "evict", 0.2, 0.21, "passkey", 1.0, True), _row("layerkv", "evict", 0.2, 0.21, "vt", 0.5, False),
            _row("layerkv", "evict", 0.5, 0.5, "passkey", 1.0, True),
            _row("kvpress", "snapkv", 0.2, 0.35, "passkey", 0.0, False),  # held 0.35 at 0.2: shown
            _row("layerkv", "quant", None, 0.28, "passkey", 1.0, True), _row("layerkv", "quant", None, 0.28, "vt", 1.0, True)]
    lines = suite_tables({"suite": rows}).splitlines()
    assert lines[0].startswith("**2k** (2 prompts per cell)")
    assert lines[2:8] == [
        "| method | fixed (KV vs FullKV) | 20% | 50% |", "|---|---|---|---|",
        "| evict |  | 50 / 75 | 100 / 100 |",
        "| kvpress snapkv |  | 0 / 0 (0.35) |  |",
        "| quant | 100 / 100 (0.28) |  |  |", ""]
    assert "| evict | 20% | 100 | 50 |" in lines and "| quant | fixed | 100 | 100 |" in lines
    assert "| kvpress snapkv | 20% | 0 | 0 |" in lines  # a task it never ran counts 0


def test_plots_drawn_for_each_kind_of_run(tmp_path):
    """Latency and memory always (into a directory that may already exist), accuracy only when the
    quality sweep has more than one fraction, a suite run its own plot per context."""
    meta = {"model": "m", "device_name": "cpu"}
    sweep = [{"ctx": 4096, "policy": "evict", "fraction": f, "quality": {"passkey_acc": 1.0, "kl": 0.1}} for f in (0.2, 0.5)]
    names = lambda paths: [os.path.basename(p) for p in paths]  # noqa: E731
    assert names(plots({"meta": meta, "cells": _cells(), "sweep": sweep[:1]}, str(tmp_path))) == ["latency.png", "memory.png"]
    assert names(plots({"meta": meta, "cells": _cells(), "sweep": sweep}, str(tmp_path))) == [
        "latency.png", "memory.png", "accuracy.png"]
    suite = [_row("layerkv", "evict", 0.2, 0.2, "passkey", 1.0, True)]
    assert names(plots({"meta": meta, "cells": [], "suite": suite}, str(tmp_path / "new"))) == ["suite_2k.png"]
    assert (tmp_path / "new" / "suite_2k.png").stat().st_size > 10_000
