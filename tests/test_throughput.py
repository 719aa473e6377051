"""bench.py --throughput's measurement and report (the end-to-end run: tests/test_bench.py): every
sequence decodes at its own advancing positions, warm-up steps stay out of the timing, a cap that
fits one sequence still measures it, and the table and plot read skipped cells and contexts
without a FullKV baseline."""
from types import SimpleNamespace

import pytest

import engine.eval.throughput as tp


def test_measure_times_the_steady_steps_at_advancing_positions(tiny_llm, monkeypatch):
    clock, positions = [0.0], []

    class Ticking(tp.Decoder):
        def step(self, token, pos):
            out = super().step(token, pos)
            positions.append((len(pos), list(pos)))
            clock[0] += self.steps  # a Decoder's k-th step takes k (fake) seconds
            return out
    monkeypatch.setattr(tp, "Decoder", Ticking)
    monkeypatch.setattr(tp, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    ids = list(range(5, 25))  # 20 tokens
    specs = [{"policy": "full"}] * tiny_llm.args.n_layers
    rows, held = tp.measure(tiny_llm, specs, ids, [1, 2, 3], steps=2, warmup=1, new=9, log=lambda _: None)
    assert [r["batch"] for r in rows] == [1, 2, 3]
    # steps 2 and 3 of each batch's Decoder are timed (2 s and 3 s), the warm-up step 1 is not
    assert [r["tokens_per_s"] for r in rows] == pytest.approx([0.4, 0.8, 1.2])
    assert [r["step_ms"] for r in rows] == pytest.approx([2500.0] * 3)
    # sequence 0 decodes in every run, so its positions run on across them; sequence 2 only in the last
    seq0 = [pos[0] for _, pos in positions]
    assert seq0 == list(range(20, 29))
    assert [pos for b, pos in positions if b == 3] == [[26, 23, 20], [27, 24, 21], [28, 25, 22]]
    assert held == 3 * (20 + 9) * tiny_llm.args.kv_bytes_per_token(4)  # FullKV allocates the room up front


def test_a_cap_that_fits_one_sequence_measures_it(tiny_llm):
    cfg = SimpleNamespace(fractions=[0.2], ctxs=[64], warmup=0, steps=1, policies=["full", "evict"])
    results = {"meta": {}, "throughput": []}
    tp.run_throughput(tiny_llm, cfg, 1 << 30, 1, results, save=lambda: None, log=lambda _: None)
    assert [(c["policy"], c["b_max"], [r["batch"] for r in c["rows"]]) for c in results["throughput"]] == [
        ("full", 1, [1]), ("evict", 1, [1])]
    results["throughput"].clear()
    tp.run_throughput(tiny_llm, cfg, 1000, 4, results, save=lambda: None, log=lambda _: None)
    assert all(c["status"] == "skipped" and "one sequence needs" in c["reason"] for c in results["throughput"])


def _cell(policy, ctx, b_max, tps):
    return {"policy": policy, "ctx": ctx, "kv_bytes_per_seq": 1 << 20, "b_max": b_max, "status": "ok",
            "rows": [{"batch": b, "tokens_per_s": t} for b, t in zip(tp.batch_sizes(b_max), tps)]}


def test_table_and_plot_compare_each_context_with_its_fullkv(tmp_path):
    results = {"meta": {"kv_memory_cap": 8 << 20, "model": "random:tiny"}, "throughput": [
        _cell("full", 200, 2, [10.0, 16.0]), _cell("evict", 200, 5, [9.0, 15.0, 28.0, 32.0]),
        {"policy": "quant", "ctx": 200, "status": "skipped", "reason": "one sequence needs 9 MiB"},
        _cell("evict", 400, 3, [8.0, 12.0, 11.0]),
        {"policy": "full", "ctx": 400, "status": "skipped", "reason": "one sequence needs 9 MiB"}]}
    table = tp.throughput_table(results).splitlines()
    assert table[4:] == [
        "| full | 200 | 1.0 MiB | 2 | 1: 10.0, 2: 16.0 | 16.0 | 1.00x |",
        "| evict | 200 | 1.0 MiB | 5 | 1: 9.0, 2: 15.0, 4: 28.0, 5: 32.0 | 32.0 | 2.00x |",
        "| quant | 200 | skipped: one sequence needs 9 MiB | | | | |",
        "| evict | 400 | 1.0 MiB | 3 | 1: 8.0, 2: 12.0, 3: 11.0 | 12.0 | – |",  # no FullKV measured at 400
        "| full | 400 | skipped: one sequence needs 9 MiB | | | | |"]
    written = tp.throughput_plot(results, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in written] == ["throughput_200.png", "throughput_400.png"]
