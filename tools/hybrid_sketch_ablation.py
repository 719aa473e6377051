"""Does a cheaper OffloadKV sketch let the hybrid hold at small budgets? One run per sketch setting.

At 10% of FullKV's device bytes an OffloadKV layer pays for its budget rows and for its on-device
sketch of the prompt's keys (`channels` of head_dim per token, min and max per `chunk` of tokens:
2 x channels / chunk 4-bit codes per token when chunk > 1, channels when chunk = 1). Before the
codes (2026-11-29) the sketch held float values, and the default 8 of 64 channels alone was 6% of
a float32 FullKV, so at 5% no layer could be offloaded; the default 16 of 64 channels as codes is
1.6%. A smaller sketch makes offloading affordable; its approximate scores then pick worse
tokens. This tool lets the profile and the planner see each setting (the profile judges OffloadKV
with the setting's parameters, and the plan's offload layers get them), then runs the plans on the
pass-key grid.

    python tools/hybrid_sketch_ablation.py --ctx 4k --fractions 0.05,0.1,0.2 \\
        --settings chunk=1,chunk=8,chunk=1+channels=8 --json out.json

(a setting without channels= keeps OffloadKV's default, a quarter of head_dim.) Its "same answer as
FullKV" column compares the whole first line of 8 greedy tokens, so it also counts the token after
the key: on the default model most differences there are FullKV's "\\n" against the needle's next
sentence, " Remember" (docs/RESULTS.md, "OffloadKV's sketch: 4-bit codes").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import Parser, check_writable, cli, parse_tokens  # noqa: E402
from engine.eval.haystack import make_haystack  # noqa: E402
from engine.eval.quality import passkey_grid  # noqa: E402
from engine.planner import make_plan  # noqa: E402
from engine.profile import ProfileConfig  # noqa: E402

GPL = "/usr/share/common-licenses/GPL-3"


def setting(text: str) -> dict:
    """'chunk=8+channels=8' -> {'offload': {'chunk': 8, 'channels': 8}}; 'pool=15' sets BudgetedEvictKV's
    score pooling kernel instead (how wide a span around a high-scoring token survives eviction)."""
    out = {"offload": {}, "evict": {}}
    for piece in text.split("+"):
        key, _, value = piece.partition("=")
        if key not in ("chunk", "channels", "pool") or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"not a setting: {piece!r} (chunk=N, channels=N, pool=N)")
        out["evict" if key == "pool" else "offload"][key] = int(value)
    return out


def run(a: argparse.Namespace) -> int:
    check_writable(a.json, "--json")
    from engine import LLM
    llm = LLM(log=lambda m: print(m, file=sys.stderr))
    tok, new = llm.tokenizer, 8
    # The profile prompts of profile_layers.py: two haystacks and natural text.
    prompts = [make_haystack(tok, a.ctx, depth=d, seed=i).ids for i, d in enumerate((0.25, 0.75))]
    if os.path.exists(GPL):
        prompts.append(tok.encode(open(GPL).read())[:a.ctx])
    full = llm.full_kv_bytes(a.ctx + new)
    names, specs = ["full"], [[{"policy": "full"}] * llm.args.n_layers]
    for text, params in a.settings:
        cfg = ProfileConfig(calibrate=())  # evict and offload only: priced alike, nothing to calibrate
        cfg.offload, cfg.evict = {**cfg.offload, **params["offload"]}, {**cfg.evict, **params["evict"]}
        t = time.perf_counter()
        stats = llm.profile(prompts, profile_tokens=None, cfg=cfg)
        print(f"{text}: profiled in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        for f in a.fractions:
            layers = make_plan(llm.args, stats, a.ctx, new, llm.model.head.element_size(), int(f * full), "hybrid",
                               cfg, 64, None, ("evict", "offload"))
            names.append(f"{text} @ {f:.0%} ({sum(o.spec['policy'] == 'offload' for o in layers)} offload layers)")
            specs.append([o.spec for o in layers])
    rows = passkey_grid(llm.model, tok, a.ctx, [0.1, 0.3, 0.5, 0.7, 0.9], list(range(a.seeds)), specs)
    print("| plan | pass key | same answer as FullKV | device KV vs FullKV | some misses (depth) |\n|---|---|---|---|---|")
    out = {}
    first_line = [r["answer"].strip().split("\n")[0] for r in rows[0]]  # FullKV's answers
    for name, rs in zip(names, rows):
        device = sum(r["kv_bytes"]["device"] for r in rs) / len(rs) / full
        agree = sum(r["answer"].strip().split("\n")[0] == ref for r, ref in zip(rs, first_line))
        misses = [f"{r['answer'].split(chr(10))[0]!r} ({r['depth']})" for r in rs if not r["found"]][:3]
        out[name] = {"found": sum(r["found"] for r in rs), "agree_with_full": agree, "trials": len(rs),
                     "device_ratio": device, "misses": misses}
        print(f"| {name} | {out[name]['found']}/{len(rs)} | {agree}/{len(rs)} | {device:.3f} | {', '.join(misses)} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"command": "python tools/hybrid_sketch_ablation.py " + " ".join(sys.argv[1:]), "plans": out}, fh,
                      indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="hybrid_sketch_ablation.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=parse_tokens, default=4096, help="prompt tokens (default 4k)")
    p.add_argument("--fractions", type=lambda t: [float(x) for x in t.split(",")], default=[0.05, 0.1, 0.2],
                   help="device KV budgets as fractions of FullKV (default 0.05,0.1,0.2)")
    p.add_argument("--settings", type=lambda t: [(x, setting(x)) for x in t.split(",")],
                   default=[(x, setting(x)) for x in ("chunk=1", "chunk=8", "chunk=1+channels=8")],
                   help="OffloadKV sketch settings, comma-separated: chunk=N, channels=N (default: a quarter "
                        "of head_dim), pool=N (eviction's pooling kernel), joined by + (default "
                        "chunk=1,chunk=8,chunk=1+channels=8)")
    p.add_argument("--seeds", type=int, default=4, help="pass keys per depth (5 depths; default 4)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return cli(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
