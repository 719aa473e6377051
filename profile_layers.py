"""Profile every layer's attention on a few prompts, print the per-layer table, and write the KV
plan (JSON, for `generate.py --policy hybrid --plan FILE`) and a PNG of the statistics and the plan.

    python profile_layers.py                          # built-in prompts, 4k tokens, hybrid plan at 20%
    python profile_layers.py --kv-budget 512MiB --ctx 8k --out plan8k.json
    python profile_layers.py --mode xkv --kv-budget 0.2   # XKV's eviction-only allocation
"""
from __future__ import annotations

import signal

if __name__ == "__main__":  # Ctrl-C while torch imports (~2 s) ends the program quietly, not in a
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # traceback; cli() takes it over ("interrupted", exit 130)

import argparse
import json
import os
import sys

from engine.cli import (Parser, check_distinct, check_figure_format, check_writable, cli, fmt_bytes, parse_tokens,
                        resolve_device)
from engine.eval.haystack import make_haystack
from engine.planner import FLOOR, check_kv_budget, harm_weights, parse_kv_budget, plan_kinds
from engine.layer_stats import FRACTIONS, stats_from_json, stats_to_json
from engine.runner import prompt_room

NATURAL_TEXT = "/usr/share/common-licenses/GPL-3"  # long plain English on Debian machines
SHOW = (0.1, 0.2, 0.4)  # budgets shown in the table, as fractions of the prompt


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="profile_layers.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as generate.py (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--prompt-file", action="append", default=[],
                   help="profile this text (repeatable); default: two pass-key haystacks and, where present, "
                        f"{NATURAL_TEXT}")
    p.add_argument("--ctx", type=parse_tokens, default=4096, help="tokens per profiled prompt and the context "
                   "the plan is made for (default 4k)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode tokens the plan budgets for (default 32)")
    p.add_argument("--plan-policies", default="auto",
                   help="hybrid: the policies the planner may choose besides full, e.g. quant,evict,offload "
                        "(default auto: all three on CUDA, evict,offload on CPU, where QuantKV saves bytes but "
                        "costs decode time: unpacking codes is slower than reading floats)")
    p.add_argument("--kv-budget", help="device KV budget: bytes (512MiB, or a whole number above 1) or a "
                   "fraction of FullKV (0.2, 20%%; 1 is all of it) (default 0.2)")
    p.add_argument("--mode", default="hybrid", choices=["hybrid", "xkv", "xkv-tau", "uniform"],
                   help="hybrid: every policy, greedy per byte; xkv: eviction with XKV's token allocation; "
                        "xkv-tau: fewest tokens reaching mean retention --tau; uniform: same eviction budget "
                        "in every layer (default hybrid)")
    p.add_argument("--tau", type=float, help="xkv-tau: mean retention target (default 0.95)")
    p.add_argument("--floor", type=int, default=FLOOR, help=f"fewest prompt tokens any layer keeps (default {FLOOR})")
    p.add_argument("--stats", metavar="FILE", help="per-layer statistics JSON: loaded if it exists (no profiling, "
                   "so plans at other budgets or modes cost nothing), else written after profiling")
    p.add_argument("--out", default="plan.json", help="plan JSON path (default plan.json)")
    p.add_argument("--png", default="profile.png", help="figure path (default profile.png; '' to skip)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    return p


def read_prompt_files(paths: list[str]) -> list[tuple[str, str]]:
    """(name, text) of each --prompt-file, read before the model loads: an unreadable or empty file is
    an error then (an empty one would give no tokens to profile)."""
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompt file {path}: {getattr(e, 'strerror', None) or e}") from None
        if not text.strip():
            raise ValueError(f"prompt file {path} is empty")
        out.append((os.path.basename(path), text))
    return out


def prompts(a, tok, files: list[tuple[str, str]]) -> list[tuple[str, list[int]]]:
    out = [(name, tok.encode(text, allow_special=False)) for name, text in files]
    if not files:
        out += [(f"haystack@{d}", make_haystack(tok, a.ctx, depth=d, seed=i).ids) for i, d in enumerate((0.25, 0.75))]
        if os.path.exists(NATURAL_TEXT):
            out.append((os.path.basename(NATURAL_TEXT), tok.encode(open(NATURAL_TEXT).read())))
    fitted = []
    for name, ids in out:
        while len(ids) < min(a.ctx, 64):
            ids = ids + ids
        fitted.append((name, ids[-a.ctx:] if len(ids) > a.ctx else ids))
    return fitted


def params(spec: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.items() if k not in ("policy", "window", "pool", "group",
                                                                      "residual", "sink", "recent"))


def draw(path: str, stats, plan, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L = len(stats)
    x = list(range(L))
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    axes[0].bar(x, [s.dense for s in stats], color="tab:gray")
    axes[0].axhline(0.2, color="tab:red", ls="--", lw=1, label="TailorKV dense threshold 0.2")
    axes[0].set_ylabel("mass outside top 5%")
    axes[0].legend(loc="upper right")
    for f, style in zip(SHOW, (":", "--", "-")):
        i = min(range(len(FRACTIONS)), key=lambda j: abs(FRACTIONS[j] - f))
        axes[1].plot(x, [s.evict_err[i] for s in stats], "tab:blue", ls=style, label=f"evict {f:.0%}")
        axes[1].plot(x, [s.offload_err[i] for s in stats], "tab:green", ls=style, label=f"offload {f:.0%}")
    for bits, style in zip(sorted(stats[0].quant_err), (":", "--", "-")):
        axes[1].plot(x, [s.quant_err[bits] for s in stats], "tab:orange", ls=style, label=f"{bits}-bit")
    axes[1].set_ylabel("attention output error")
    axes[1].legend(loc="lower right", ncol=3, fontsize=8)
    colors = {"full": "black", "quant": "tab:orange", "evict": "tab:blue", "offload": "tab:green"}
    axes[2].bar(x, [o.device_bytes / 2**20 for o in plan], color=[colors[o.spec["policy"]] for o in plan])
    for xi, o in zip(x, plan):
        axes[2].text(xi, o.device_bytes / 2**20, params(o.spec).replace(" ", "\n"), ha="center", va="bottom",
                     fontsize=6)
    axes[2].set_ylim(0, 1.45 * max(o.device_bytes for o in plan) / 2**20)  # room for labels and legend
    axes[2].set_ylabel("device KV MiB")
    axes[2].set_xlabel("layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    axes[2].legend(handles, list(colors), loc="upper right", ncol=4)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(a: argparse.Namespace) -> int:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    # Everything the flags can get wrong is checked before the model loads.
    if a.new_tokens < 0:
        raise ValueError(f"--new-tokens must be >= 0, got {a.new_tokens}")
    if a.floor < 1:
        raise ValueError(f"--floor must be >= 1 token, got {a.floor}")
    # Flags the chosen mode would ignore are refused, then defaults filled in
    if a.tau is not None and a.mode != "xkv-tau":
        raise ValueError(f"--tau is the target of --mode xkv-tau, not --mode {a.mode}")
    if a.kv_budget is not None and a.mode == "xkv-tau":
        raise ValueError("--mode xkv-tau takes the fewest tokens reaching --tau: it has no --kv-budget")
    a.tau = 0.95 if a.tau is None else a.tau
    a.kv_budget = "0.2" if a.kv_budget is None else a.kv_budget
    if not 0.0 < a.tau <= 1.0:
        raise ValueError(f"--tau is a mean retention in (0, 1], got {a.tau}")
    if a.prompt_file and a.stats and os.path.exists(a.stats):
        raise ValueError(f"--stats {a.stats} exists, so its statistics are used and --prompt-file would profile "
                         "nothing: give another --stats path, or none")
    parse_kv_budget(a.kv_budget, 1)  # the syntax; the bytes follow from the model
    files = read_prompt_files(a.prompt_file)
    for path, flag in ((a.out, "--out"), (a.png or None, "--png"), (a.stats, "--stats")):  # --png '': none
        if not (flag == "--stats" and os.path.isfile(path or "")):  # an existing --stats file is read
            check_writable(path, flag)
    check_distinct({"--out": a.out, "--png": a.png, "--stats": a.stats},
                   [("--prompt-file", f) for f in a.prompt_file or []])
    if a.png:
        check_figure_format(a.png)
    if a.plan_policies != "auto" and a.mode != "hybrid":
        raise ValueError(f"--plan-policies chooses among a hybrid plan's policies; --mode {a.mode} evicts only")
    device, dtype = resolve_device(a.device, a.dtype)
    # The budget, and a --stats file's model, against the model's config: before the weights load
    from weights.load import model_config
    name, args = model_config(a.model)
    ctx = prompt_room(args, name, a.new_tokens, a.ctx)
    check_kv_budget(args, a.kv_budget, ctx, a.new_tokens, dtype.itemsize, a.mode, plan_kinds(a.plan_policies, device),
                    a.floor)
    stats = None
    if a.stats and os.path.exists(a.stats):
        try:
            with open(a.stats) as f:
                saved = json.load(f)
            same = saved.get("model") == name and len(saved.get("layers", [])) == args.n_layers
            stats, profiled = stats_from_json(saved["layers"]), saved["profiled"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{a.stats}: not a --stats file of profile_layers.py ({type(e).__name__})") from None
        if not same:
            raise ValueError(f"{a.stats}: statistics of another model ({saved.get('model')!r})")

    from engine import LLM
    llm = LLM(a.model, a.device, a.dtype, log=log)
    if stats is not None:
        log(f"loaded statistics from {a.stats}")
    else:
        named = prompts(a, llm.tokenizer, files)
        profiled = [f"{name} ({len(ids)} tokens)" for name, ids in named]
        from tqdm import tqdm
        bar = tqdm(total=llm.args.n_layers * len(named), desc="profile", unit="layer", file=sys.stderr, leave=False,
                   disable=None)
        stats = llm.profile([ids for _, ids in named], profile_tokens=None, kinds=a.plan_policies,
                            on_layer=bar.update)
        bar.close()
        if a.stats:
            with open(a.stats, "w") as f:
                json.dump({"model": llm.name, "profiled": profiled, "layers": stats_to_json(stats)}, f)
    plan = llm.plan(stats=stats, kv_budget=a.kv_budget, new_tokens=a.new_tokens, context=ctx, mode=a.mode,
                    kinds=a.plan_policies, floor=a.floor, tau=a.tau)
    plan.header["profiled"] = profiled
    budget, full = plan.header["kv_budget_bytes"], plan.header["full_kv_bytes"]

    idx = [min(range(len(FRACTIONS)), key=lambda j: abs(FRACTIONS[j] - f)) for f in SHOW]
    pct = "/".join(f"{f:.0%}" for f in SHOW)
    print(f"| layer | dense | evict kept @{pct} | evict err @{pct} | offload err @{pct} | quant err 1/2/4 bit "
          f"| plan | device |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (s, o) in enumerate(zip(stats, plan.layers)):
        ev = "/".join(f"{s.evict[j]:.2f}" for j in idx) + " | " + "/".join(f"{s.evict_err[j]:.2f}" for j in idx)
        off = "/".join(f"{s.offload_err[j]:.2f}" for j in idx)
        qe = "/".join(f"{s.quant_err[b]:.2f}" for b in sorted(s.quant_err))
        mark = " **dense**" if s.dense > 0.2 else ""
        print(f"| {i} | {s.dense:.3f}{mark} | {ev} | {off} | {qe} | {o.spec['policy']} {params(o.spec)} "
              f"| {fmt_bytes(o.device_bytes)} |")
    used = plan.device_bytes
    w = harm_weights(stats[0])
    print("\nKL per unit of attention-output error, relative to evict and offload's (the planner's weights): "
          + ", ".join(f"{k} {v:.2f}" for k, v in w.items()) + ("" if stats[0].harm else " (not calibrated)"))
    target = f"mean retention {a.tau}" if a.mode == "xkv-tau" else f"a {fmt_bytes(budget)} budget"  # tau: no budget
    print(f"\nplan ({a.mode}): {fmt_bytes(used)} for {target} ({used / full:.1%} of FullKV "
          f"{fmt_bytes(full)}), mean quality {plan.header['mean_quality']:.3f}; "
          f"host {fmt_bytes(sum(o.host_bytes for o in plan.layers))}")
    plan.save(a.out)
    log(f"wrote {a.out}")
    if a.png:
        draw(a.png, stats, plan.layers, f"{llm.name}: per-layer attention and the {a.mode} plan at "
                                        f"{fmt_bytes(budget)} ({ctx} tokens)")
        log(f"wrote {a.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
