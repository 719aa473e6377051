"""OffloadKV on a CUDA GPU: decode ms/token for each lookahead mode, CUDA graphs on and off, the
side-stream overlap on and off, and the time the copy kernels take, next to FullKV and
BudgetedEvictKV at the same budget. What bench.py's matrix does not separate; the README's
"OffloadKV on the H100" table comes from this script.

    python tools/offload_gpu.py --ctx 32k,128k --budget 2048
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import parse_tokens  # noqa: E402
from engine.config import preset  # noqa: E402
from engine.model import Llama  # noqa: E402
from engine.runner import GenerationResult, stream_tokens  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


def configs(budget: int) -> list[tuple[str, dict, bool]]:
    off = {"policy": "offload", "budget": budget}
    rows = [("full eager", {"policy": "full"}, False), ("full graph", {"policy": "full"}, True),
            ("evict graph", {"policy": "evict", "budget": budget}, True),
            ("offload/none eager", {**off, "lookahead": "none"}, False)]
    rows += [(f"offload/{la} graph", {**off, "lookahead": la}, True) for la in ("none", "layer", "step")]
    rows += [(f"offload/{la} graph no-overlap", {**off, "lookahead": la, "overlap": False}, True)
             for la in ("layer", "step")]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", default="32k,128k", help="prompt lengths, comma-separated (default 32k,128k)")
    p.add_argument("--budget", type=int, default=2048, help="tokens per layer for offload and evict (default 2048)")
    p.add_argument("--preset", default="llama-3.1-8b", help="random-weight model shapes (default llama-3.1-8b)")
    p.add_argument("--steps", type=int, default=41, help="decode steps; the first 8 are not timed (default 41)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("offload_gpu.py: error: needs a CUDA GPU")
    args = preset(a.preset)
    m = Llama.random(args, "cuda", torch.bfloat16)
    for T in (parse_tokens(c) for c in a.ctx.split(",")):
        ids = torch.randint(100, args.vocab_size, (T,), generator=torch.Generator().manual_seed(0)).tolist()
        for name, spec, graphs in configs(a.budget):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            # Copy-kernel time is read from a profile of 4 eager steps (graph replays hide kernels).
            prof = profile(activities=[ProfilerActivity.CUDA]) if name == "offload/none eager" else None
            r = GenerationResult(len(ids))
            for done, _ in enumerate(stream_tokens(m, ids, a.steps, SamplingParams(), spec, r, cuda_graphs=graphs), 1):
                if prof is not None and done == 20:
                    prof.start()
                if prof is not None and done == 24:
                    torch.cuda.synchronize()
                    prof.stop()
            ms = 1e3 * statistics.median(r.decode_times_s[8:])
            copy = "" if prof is None else " copy kernels %.2f ms/token" % (sum(
                e.self_device_time_total for e in prof.key_averages() if "gather_rows" in e.key) / 4e3)
            kv = r.kv_bytes()
            moved = sum(p.transfer_bytes() for p in r.policies) / (len(r.decode_times_s) + 1)
            print(f"ctx {T} {name:30s} graph={r.cuda_graphs!s:5} prefill {r.prefill_s:6.2f} s decode {ms:6.2f} "
                  f"ms/token moved {moved / 2**20:6.1f} MiB/token KV device {kv['device'] / 2**30:.2f} GiB host "
                  f"{kv['host'] / 2**30:.2f} GiB peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB{copy}",
                  flush=True)
            del r


if __name__ == "__main__":
    main()
