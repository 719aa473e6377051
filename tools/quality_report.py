"""KV policies vs FullKV on the default model: pass-key accuracy over a depth x key grid, and
teacher-forced KL(full || policy), top-1 agreement and perplexity over a continuation of real text.
A stand-in until bench.py exists. Policies are written name[:key=value,...], e.g.

    python tools/quality_report.py --ctx 4k full quant:bits=1 quant:bits=2 quant:bits=4
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.haystack import FILLER  # noqa: E402
from engine.quality import fidelity, passkey_grid  # noqa: E402
from generate import parse_tokens  # noqa: E402
from weights.load import load_model  # noqa: E402

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"  # long natural English on any Debian machine


def parse_policy(text: str, m) -> dict | list[dict]:
    """'full', 'quant:bits=2,residual=128', or 'plan:PATH' (a plan from profile_layers.py)."""
    name, _, params = text.partition(":")
    if name == "plan":
        from engine.planner import load_plan
        return load_plan(params, m.name, m.args.n_layers)[1]
    spec = {"policy": name}
    for kv in filter(None, params.split(",")):
        key, _, value = kv.partition("=")
        spec[key] = float(value) if "." in value else int(value)
    return spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policies", nargs="+", help="policies to compare, e.g. full quant:bits=2")
    p.add_argument("--ctx", type=parse_tokens, default=4096, help="prompt length in tokens (default 4k)")
    p.add_argument("--continuation", type=int, default=256, help="teacher-forced tokens after the prompt (default 256)")
    p.add_argument("--text", default=DEFAULT_TEXT, help=f"text for the KL prompt+continuation (default {DEFAULT_TEXT})")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="pass-key depths (default 0.1,...,0.9)")
    p.add_argument("--seeds", type=int, default=2, help="keys per depth (default 2)")
    a = p.parse_args()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    m = load_model(None, "cpu", torch.float32, log=log)
    text = open(a.text).read() if os.path.exists(a.text) else FILLER * 2000
    ids = m.tokenizer.encode(text)
    while len(ids) < a.ctx + a.continuation:  # a short text is repeated: still real language
        ids = ids + ids
    prompt, cont = ids[:a.ctx], ids[a.ctx:a.ctx + a.continuation]
    depths = [float(d) for d in a.depths.split(",")]
    specs = [parse_policy(name, m) for name in a.policies]
    t = time.perf_counter()
    fids = fidelity(m.model, prompt, cont, specs)
    log(f"teacher-forced {len(cont)} tokens for {len(specs)} policies in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    grids = passkey_grid(m.model, m.tokenizer, a.ctx, depths, list(range(a.seeds)), specs)
    log(f"pass key: {len(grids[0])} haystacks in {time.perf_counter() - t:.0f} s")
    full_kv = m.args.kv_bytes_per_token(4) * (a.ctx + 8)
    rows = []
    for name, fid, pk in zip(a.policies, fids, grids):
        rows.append((name, sum(r["found"] for r in pk), len(pk), fid, pk[0]["kv_bytes"]["device"] / full_kv))
        log(f"{name}: {rows[-1][1]}/{len(pk)} keys, KL {fid.kl:.4f}")
        for r in pk:
            if not r["found"]:
                log(f"   missed depth {r['depth']} key {r['key']}: {r['answer']!r}")
    print(f"\n{m.name}, float32 CPU, {a.ctx}-token prompts; KL/top-1/ppl over {a.continuation} teacher-forced "
          f"tokens of {os.path.basename(a.text)}; pass key over {len(depths)} depths x {a.seeds} keys\n")
    print("| policy | pass key | KL(full‖policy) nats | top-1 agree | ppl (full) | device KV vs FullKV "
          "| host->device per token |")
    print("|---|---|---|---|---|---|---|")
    for name, hit, n, f, frac in rows:
        print(f"| {name} | {hit}/{n} | {f.kl:.4f} | {f.top1:.3f} | {f.ppl:.2f} ({f.ppl_full:.2f}) | {frac:.3f} "
              f"| {f.h2d_bytes_per_token / 1024:.1f} KiB |")


if __name__ == "__main__":
    main()
