"""bench.py --throughput: decode tokens/s against batch size, at a fixed KV memory cap.

XKV's throughput claim in one measurement: a step reads the weights once however many sequences
decode, so tokens/s grows with the batch until the caches fill the memory; a policy that keeps 20%
of the cache fits ~5x the sequences in the same memory, and so decodes more tokens per second.

For each policy: the largest batch B_max of N-token prompts whose KV caches fit the cap (on a CPU
host bytes count too: host memory is the device there, so offloading frees nothing), then decode
tokens/s at batch 1, 2, 4, ... and B_max. All B_max sequences are prefilled once and kept; each
batch size decodes the first B of them for warm-up + timed steps (their caches have room for every
run), so the memory held is always the full B_max's: the cap is really met, not inferred.
"""
from __future__ import annotations

import statistics
import time

import torch

from engine.cli import fmt_bytes
from engine.eval.cells import guarded, policy_specs, prompt_len, release, text_ids
from engine.graphs import Decoder
from engine.kv import build_policies
from engine.runner import sync


def batch_sizes(b_max: int) -> list[int]:
    """1, 2, 4, ... below b_max, then b_max itself: 1, 2, 4, 8, 13 for b_max 13."""
    sizes = [1 << i for i in range(b_max.bit_length()) if 1 << i < b_max]
    return sizes + [b_max]


def measure(m, specs: list[dict], ids: list[int], batches: list[int], steps: int, warmup: int, new: int,
            log) -> tuple[list[dict], int]:
    """Prefill max(batches) copies of the prompt, each with room for `new` tokens, then time `steps`
    greedy decode steps (after `warmup` untimed ones) for each batch size -> (one row per batch
    size, the KV bytes all the sequences held once prefilled, counted as the cap counts them)."""
    device, run = m.device, warmup + steps
    n_seq = max(batches)
    capacity = len(ids) + new  # sequence 0 decodes in every run: new >= len(batches) * run
    seqs = [build_policies(m.args, specs, capacity, device, m.dtype) for _ in range(n_seq)]
    prompt = torch.tensor([ids], device=device)
    t = time.perf_counter()
    tokens = torch.cat([m.model.prefill(prompt, seq).argmax(-1) for seq in seqs])  # (n_seq,) first tokens
    log(f"    prefilled {n_seq} x {len(ids)} tokens in {time.perf_counter() - t:.1f} s")
    counted = ("device", "host") if device.type == "cpu" else ("device",)
    held = sum(n for seq in seqs for p in seq for tier, n in p.nbytes().items() if tier in counted)
    pos = [len(ids)] * n_seq
    rows = []
    for b in batches:
        decoder, times = Decoder(m.model, seqs[:b]), []
        for s in range(run):
            sync(device)
            t = time.perf_counter()
            tokens[:b] = decoder.step(tokens[:b], pos[:b]).argmax(-1)
            sync(device)
            if s >= warmup:
                times.append(time.perf_counter() - t)
            pos[:b] = [p + 1 for p in pos[:b]]
        rows.append({"batch": b, "tokens_per_s": b * len(times) / sum(times),
                     "step_ms": 1000 * statistics.median(times), "cuda_graphs": decoder.graphed})
        log(f"    batch {b}: {rows[-1]['tokens_per_s']:.1f} tokens/s ({rows[-1]['step_ms']:.1f} ms/step)")
    return rows, held


def run_throughput(m, cfg, cap: int, max_batch: int, results: dict, save, log) -> None:
    """Every policy of cfg at every context of cfg, at the first kept fraction, under `cap` bytes."""
    fraction = cfg.fractions[0]
    results["meta"]["kv_memory_cap"] = cap
    for ctx in cfg.ctxs:
        new = len(batch_sizes(max_batch)) * (cfg.warmup + cfg.steps)  # every run's tokens, for sequence 0
        ids = text_ids(m, prompt_len(m, ctx, new))
        for name in cfg.policies:
            cell = {"engine": "layerkv", "policy": name, "ctx": ctx, "prompt_tokens": len(ids), "fraction": fraction}

            def work():
                specs = policy_specs(name, m, ids, fraction, new)
                specs = specs if isinstance(specs, list) else [specs] * m.args.n_layers
                per_seq = m.kv_footprint(specs, len(ids), new)
                b_max = min(max_batch, cap // per_seq)
                log(f"  {name} at {len(ids)} tokens: {fmt_bytes(per_seq)} KV per sequence, "
                    f"{b_max} fit in {fmt_bytes(cap)}")
                if b_max < 1:
                    return {"status": "skipped", "reason": f"one sequence needs {fmt_bytes(per_seq)}",
                            "kv_bytes_per_seq": per_seq}
                rows, held = measure(m, specs, ids, batch_sizes(b_max), cfg.steps, cfg.warmup, new, log)
                return {"kv_bytes_per_seq": per_seq, "b_max": b_max, "kv_bytes_held": held, "rows": rows}

            results["throughput"].append(guarded(cell, m.device, work, log))
            release(m.device)
            save()


def best(cell: dict) -> float:
    return max((r["tokens_per_s"] for r in cell.get("rows", [])), default=0.0)


def throughput_table(results: dict) -> str:
    """One row per policy and context: the largest batch that fits, tokens/s by batch size, the
    best against FullKV's best in the same memory."""
    cells = results["throughput"]
    cap = results["meta"].get("kv_memory_cap", 0)
    out = [f"Decode throughput at a KV memory cap of {fmt_bytes(cap)} (the largest batch of equal prompts "
           "whose caches fit; all of them held while every batch size decodes):", "",
           "| policy | ctx | KV per sequence | largest batch | tokens/s by batch | best tokens/s | vs FullKV |",
           "|---|---|---|---|---|---|---|"]
    full = {c["ctx"]: best(c) for c in cells if c["policy"] == "full" and c.get("rows")}
    for c in cells:
        lead = f"| {c['policy']} | {c['ctx']} "
        if not c.get("rows"):
            out.append(lead + f"| {c['status']}: {c.get('reason', '')} | | | | |")
            continue
        by_batch = ", ".join(f"{r['batch']}: {r['tokens_per_s']:.1f}" for r in c["rows"])
        ratio = f"{best(c) / full[c['ctx']]:.2f}x" if full.get(c["ctx"]) else "–"
        out.append(lead + f"| {fmt_bytes(c['kv_bytes_per_seq'])} | {c['b_max']} | {by_batch} "
                   f"| {best(c):.1f} | {ratio} |")
    return "\n".join(out)


def throughput_plot(results: dict, out_dir: str) -> list[str]:
    """throughput.png: tokens/s against the KV memory the batch holds, one line per policy."""
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    cap = results["meta"].get("kv_memory_cap", 0) / 2 ** 30
    for ctx in dict.fromkeys(c["ctx"] for c in results["throughput"]):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c in results["throughput"]:
            if c["ctx"] == ctx and c.get("rows"):
                xs = [r["batch"] * c["kv_bytes_per_seq"] / 2 ** 30 for r in c["rows"]]
                ax.plot(xs, [r["tokens_per_s"] for r in c["rows"]], marker="o", label=c["policy"])
                ax.annotate(f"B={c['b_max']}", (xs[-1], c["rows"][-1]["tokens_per_s"]), fontsize=7)
        ax.axvline(cap, color="grey", linestyle=":", label="memory cap")
        ax.set_xlabel("KV memory held by the batch (GiB)")
        ax.set_ylabel("decode tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Throughput vs KV memory, {ctx}-token prompts, {results['meta']['model']}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"throughput_{ctx}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
