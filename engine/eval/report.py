"""bench.py's outputs from its result dict: the markdown table (stdout and --markdown), PNG plots
(--plots). Every number shown comes from the run's cells; a skipped or failed cell says why."""
from __future__ import annotations

import os

MiB = 2 ** 20


def _ctx_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _q(c: dict, key: str, fmt: str) -> str:
    q = c.get("quality")
    if not q:
        return "–"
    if "error" in q:
        return "error"
    return format(q[key], fmt)


def table(results: dict) -> str:
    """One row per cell: latency, memory, and quality against FullKV at the same context."""
    head = ("| engine | policy | ctx | prompt | prefill s | decode ms/tok | KV device MiB | KV host MiB "
            "| KV vs FullKV | peak mem MiB | pass key | KL(full‖x) | top-1 | ppl |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in results["cells"]:
        lead = f"| {c['engine']} | {c['policy']} | {_ctx_label(c['ctx'])} | {c.get('prompt_tokens', '–')} "
        q = c.get("quality") or {}
        pk = f"{q['passkey_found']}/{q['passkey_trials']}" if "passkey_found" in q else "–"
        quality = f" {pk} | {_q(c, 'kl', '.4f')} | {_q(c, 'top1', '.3f')} | {_q(c, 'ppl', '.2f')} |"
        if c["status"] != "ok":  # the latency run failed or was skipped; quality may still stand
            rows.append(lead + f"| {c['status']}: {c.get('reason', '')} |" + " |" * 5 + (quality if q else " |" * 4))
            continue
        rows.append(lead + f"| {c['prefill_s']:.2f} | {c['decode_ms_per_token']:.1f} "
                    f"| {c['kv_bytes']['device'] / MiB:.1f} | {c['kv_bytes']['host'] / MiB:.1f} "
                    f"| {c['kv_ratio']:.3f} | {c['peak_memory_bytes'] / MiB:.0f} |" + quality)
    return "\n".join(rows)


def describe(results: dict) -> str:
    """The run's circumstances, one paragraph: what the numbers mean and how they were made."""
    m = results["meta"]
    mem = {"cuda_max_allocated": "peak = torch.cuda.max_memory_allocated during the cell (weights included; "
                                 "for the hybrid, during its run: the profiling pass's is plan_peak_memory_bytes "
                                 "in the JSON)",
           "rss": "peak = the process's peak resident memory during the cell (weights included; reset per "
                  "cell through /proc/self/clear_refs; for the hybrid, after its profiling pass)"}
    mem = mem["cuda_max_allocated" if m["device"].startswith("cuda") else "rss"]
    if m.get("suite"):
        return "\n".join([f"`{m['command']}`", "", (
            f"{m['date']}; {m['model']} ({m['dtype']}) on {m['device_name']}; torch {m['torch']}, "
            f"transformers {m.get('transformers') or 'not installed'}, kvpress {m.get('kvpress') or 'not installed'}. "
            f"Tasks: {', '.join(m['tasks'])}; {m['seeds']} prompt(s) each. Greedy answers; agreement = the same "
            "answer as FullKV's (the first n answer items, n = what the task asks for; list markers, "
            "punctuation and case aside); accuracy = share of the expected answers "
            "found. At a kept fraction f: evict/offload keep f of the prompt's tokens per layer, hybrid plans "
            "for f of FullKV's bytes (profiled per prompt), kvpress presses use compression_ratio 1 - f.")]
            + ([f"Skipped peers: {m['skipped_peers']}"] if m.get("skipped_peers") else [])
            + ([m["note"]] if m.get("note") else []))
    lines = [f"`{m['command']}`", "",
             (f"{m['date']}; {m['model']} ({m['dtype']}) on {m['device_name']}; torch {m['torch']}, "
             f"transformers {m.get('transformers') or 'not installed'}, kvpress {m.get('kvpress') or 'not installed'}. "
             f"Kept-KV fraction {m['fractions'][0]}: evict/offload keep that share of the prompt's tokens per layer, "
             f"kvpress presses use compression_ratio {1 - m['fractions'][0]:.2f}, hybrid plans for that share of "
             f"FullKV's bytes, quant is 4-bit. Decode: median of {m['steps']} greedy steps after {m['warmup']} "
             f"warm-up steps. KV vs FullKV = device KV bytes / FullKV's at the same length; {mem}.")]
    if m.get("gpu_memory_cap"):
        lines.append(f"The process was capped at {m['gpu_memory_cap'] / 2**30:.1f} GiB of GPU memory "
                     "(--gpu-memory): a cell that needed more failed with out-of-memory, as on a smaller card.")
    if m.get("quality_note"):
        lines.append(m["quality_note"])
    return "\n".join(lines)


def suite_tables(results: dict) -> str:
    """bench.py --suite: per context, agreement with FullKV's answer / task accuracy per method and
    kept fraction (methods whose memory does not follow the fraction in the 'fixed' column, with the
    share of FullKV they held), then accuracy per task."""
    from engine.eval.suite import summary
    rows = summary(results.get("suite", []))
    out = []
    for ctx in dict.fromkeys(r["ctx"] for r in rows):
        rs = [r for r in rows if r["ctx"] == ctx]
        fracs = sorted({r["fraction"] for r in rs if r["fraction"] is not None})
        n = max(r["n"] for r in rs)
        out += [f"**{_ctx_label(ctx)}** ({n} prompts per cell): agreement with FullKV's greedy answer / task accuracy, % "
                "(in brackets: the device KV held vs FullKV, where it is off the column's fraction by > 10%)",
                "", "| method | fixed (KV vs FullKV) |" + "".join(f" {f:.0%} |" for f in fracs),
                "|---|---|" + "---|" * len(fracs)]
        for method in dict.fromkeys((r["engine"], r["policy"]) for r in rs):
            cells = {r["fraction"]: r for r in rs if (r["engine"], r["policy"]) == method}
            pct = lambda r: f"{r['agreement']:.0%} / {r['accuracy']:.0%}".replace("%", "")  # noqa: E731
            # A method whose device KV is off its nominal fraction by more than 10% shows what it held:
            # OffloadKV's on-device sketch adds ~1.6% of a float32 FullKV, kvpress's AdaKV masks instead of evicting.
            held = lambda r, f: pct(r) + (f" ({r['kv_ratio']:.2f})" if abs(r["kv_ratio"] - f) > 0.1 * f else "")  # noqa: E731
            fixed = f"{pct(cells[None])} ({cells[None]['kv_ratio']:.2f})" if None in cells else ""
            name = method[1] if method[0] == "layerkv" else f"{method[0]} {method[1]}"
            out.append(f"| {name} | {fixed} |" + "".join(f" {held(cells[f], f) if f in cells else ''} |" for f in fracs))
        tasks = list(dict.fromkeys(t for r in rs for t in r["by_task"]))
        out += ["", f"Accuracy per task at {_ctx_label(ctx)}, %:", "",
                "| method | fraction | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for r in rs:
            name = r["policy"] if r["engine"] == "layerkv" else f"{r['engine']} {r['policy']}"
            frac = "fixed" if r["fraction"] is None else f"{r['fraction']:.0%}"
            out.append(f"| {name} | {frac} | " + " | ".join(f"{r['by_task'].get(t, 0):.0%}"[:-1] for t in tasks) + " |")
        out.append("")
    return "\n".join(out)


def markdown(results: dict) -> str:
    parts = [describe(results)]
    if results["cells"]:
        parts.append(table(results))
    if results.get("suite"):
        parts.append(suite_tables(results))
    if results.get("throughput"):
        from engine.eval.throughput import throughput_table
        parts.append(throughput_table(results))
    return "\n\n".join(parts) + "\n"


def suite_plot(results: dict, out_dir: str) -> list[str]:
    """suite_<ctx>.png: agreement and accuracy vs the KV kept (a fraction method at its nominal
    fraction, a fixed one at the share of FullKV it held)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from engine.eval.suite import summary

    rows, written = summary(results.get("suite", [])), []
    style = {"layerkv": "-", "transformers": "--", "kvpress": ":"}
    colours = plt.get_cmap("tab20").colors
    for ctx in dict.fromkeys(r["ctx"] for r in rows):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        methods = list(dict.fromkeys((r["engine"], r["policy"]) for r in rows if r["ctx"] == ctx))
        for i, method in enumerate(methods):
            rs = sorted((r for r in rows if r["ctx"] == ctx and (r["engine"], r["policy"]) == method),
                        key=lambda r: r["kv_ratio"] if r["fraction"] is None else r["fraction"])
            xs = [r["kv_ratio"] if r["fraction"] is None else r["fraction"] for r in rs]
            label = method[1] if method[0] == "layerkv" else f"{method[0]} {method[1]}"
            for ax, key in zip(axes, ("agreement", "accuracy")):
                ax.plot(xs, [r[key] for r in rs], style.get(method[0], "-"), marker="o" if len(rs) > 1 else "*",
                        markersize=5 if len(rs) > 1 else 11, color=colours[i % 20], label=label)
        for ax, label in zip(axes, ("agreement with FullKV's answer", "task accuracy")):
            ax.set_xlabel("KV kept (fraction of FullKV)")
            ax.set_ylabel(label)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"RULER-style suite, {_ctx_label(ctx)} tokens, {results['meta']['model']}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"suite_{_ctx_label(ctx)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plots(results: dict, out_dir: str) -> list[str]:
    """latency.png, memory.png (vs context, one line per engine/policy); accuracy.png when the
    quality was measured at several kept fractions. Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    if results.get("throughput"):
        from engine.eval.throughput import throughput_plot
        return throughput_plot(results, out_dir)
    if not results["cells"]:  # a --suite run
        return suite_plot(results, out_dir)
    ok = [c for c in results["cells"] if c["status"] == "ok"]
    series: dict[tuple[str, str], list[dict]] = {}
    for c in ok:
        series.setdefault((c["engine"], c["policy"]), []).append(c)
    style = {"layerkv": "-", "transformers": "--", "kvpress": ":"}  # engine by line style, policy by colour
    colours = plt.get_cmap("tab20").colors
    ctxs = sorted({c["ctx"] for c in ok})
    written = []
    for fname, panels in (("latency.png", [("decode_ms_per_token", "decode ms/token"), ("prefill_s", "prefill s")]),
                          ("memory.png", [("kv_device_mib", "device KV MiB"), ("peak_mib", "peak memory MiB")])):
        fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
        for ax, (key, label) in zip(axes, panels):
            for i, ((engine, policy), cs) in enumerate(sorted(series.items())):
                cs = sorted(cs, key=lambda c: c["ctx"])
                ys = [c["kv_bytes"]["device"] / MiB if key == "kv_device_mib" else
                      c["peak_memory_bytes"] / MiB if key == "peak_mib" else c[key] for c in cs]
                ax.plot([c["ctx"] for c in cs], ys, style.get(engine, "-"), marker="o", color=colours[i % 20],
                        label=policy if engine == "layerkv" else f"{engine} {policy}")
            # log scales: contexts double, and one slow peer must not flatten everyone else's line
            ax.set_xscale("log", base=2)
            ax.set_xticks(ctxs, [_ctx_label(n) for n in ctxs])
            ax.minorticks_off()
            if fname == "latency.png":
                ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{results['meta']['model']} on {results['meta']['device_name']}")
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    sweep = [r for r in results.get("sweep", []) if "passkey_acc" in r["quality"]]
    if len({r["fraction"] for r in sweep}) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ctx in sorted({r["ctx"] for r in sweep}):
            for name in sorted({r["policy"] for r in sweep}):
                rs = sorted((r for r in sweep if r["ctx"] == ctx and r["policy"] == name), key=lambda r: r["fraction"])
                for ax, key in zip(axes, ("passkey_acc", "kl")):
                    ax.plot([r["fraction"] for r in rs], [r["quality"][key] for r in rs], marker="o",
                            label=f"{name} @ {_ctx_label(ctx)}")
        for ax, label in zip(axes, ("pass-key accuracy", "KL(full‖policy) nats")):
            ax.set_xlabel("kept KV fraction")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "accuracy.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
