"""Prefill tokens/s and decode ms/token, this engine (FullKV) vs Hugging Face transformers (its default
dynamic cache), on the same weights, prompt and dtype, in one process, alternating rounds so both see
the same machine conditions. A stand-in until bench.py exists; numbers are medians over rounds.

    python tools/speed_vs_hf.py --ctx 4k --steps 32 --rounds 3
    python tools/speed_vs_hf.py --ctx 8k --policy plan:plan8k.json   # a hybrid plan vs transformers
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.runner import generate  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from generate import parse_tokens  # noqa: E402
from quality_report import parse_policy  # noqa: E402
from weights.load import DEFAULT_MODEL, default_gguf_path, load_model  # noqa: E402


@torch.inference_mode()
def hf_run(model, ids: list[int], steps: int) -> tuple[float, list[float]]:
    """Prefill (logits for the last position only) then `steps` greedy decode steps."""
    x = torch.tensor([ids])
    t = time.perf_counter()
    out = model(x, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t
    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tok.item()
        times.append(time.perf_counter() - t)
    return prefill, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=parse_tokens, default=4096, help="prompt length in tokens (default 4k)")
    p.add_argument("--steps", type=int, default=32, help="decode steps per round (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per engine (default 3)")
    p.add_argument("--policy", default="full", help="this engine's KV policy: full, quant:bits=4, plan:FILE, ...")
    a = p.parse_args()
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    ours = load_model(DEFAULT_MODEL, "cpu", torch.float32, log=lambda _: None)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, ours.args.vocab_size, (a.ctx,), generator=g).tolist()
    spec = parse_policy(a.policy, ours)
    rows = {f"layerkv ({a.policy})": ([], []), "transformers": ([], [])}
    kv = None
    for r in range(a.rounds):
        res = generate(ours.model, ids, a.steps + 1, SamplingParams(), spec)
        kv = res.kv_bytes()
        rows[f"layerkv ({a.policy})"][0].append(res.prefill_s)
        rows[f"layerkv ({a.policy})"][1].append(res.decode_ms_per_token)
        pre, times = hf_run(hf, ids, a.steps)
        rows["transformers"][0].append(pre)
        rows["transformers"][1].append(1000 * statistics.median(times))
        print(f"round {r + 1}/{a.rounds}: layerkv {res.decode_ms_per_token:.1f} ms/token, "
              f"transformers {1000 * statistics.median(times):.1f} ms/token", file=sys.stderr)
    print(f"\nSmolLM2-135M-Instruct, float32, CPU ({torch.get_num_threads()} threads), {a.ctx}-token prompt, "
          f"{a.steps} decode steps, median of {a.rounds} rounds, torch {torch.__version__}\n")
    print("| engine | prefill tok/s | decode ms/token |\n|---|---|---|")
    for name, (pre, dec) in rows.items():
        print(f"| {name} | {a.ctx / statistics.median(pre):.0f} | {statistics.median(dec):.1f} |")
    ratio = statistics.median(rows["transformers"][1]) / statistics.median(rows[f"layerkv ({a.policy})"][1])
    full = ours.args.kv_bytes_per_token(4) * (a.ctx + a.steps + 1)
    print(f"\ndecode speed-up over transformers: {ratio:.2f}x; layerkv KV on device "
          f"{kv['device'] / 2**20:.1f} MiB ({kv['device'] / full:.1%} of FullKV), host {kv['host'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
