"""OffloadKV on a CUDA GPU: decode ms/token per chunk size and lookahead mode, CUDA graphs on and
off, the time the copy and selection kernels take, the bytes moved and the reuse rate (the share of
selected rows already on the device), next to FullKV and BudgetedEvictKV at the same budget. What
bench.py's matrix does not separate; docs/RESULTS.md's "OffloadKV on the H100" table comes from this script.

    python tools/offload_gpu.py --ctx 32k,128k --budget 2048 --chunks 1,8,16
    python tools/offload_gpu.py --ctx 128k --lookahead none,layer,step --overlap-off
    python tools/offload_gpu.py --ctx 32k --chunks 16 --lookahead layer,step --copy-programs 0,8,32

--copy-programs: the overlapped (side-stream) copy on at most that many programs, one SM each
(kernels/prefetch.py; 0 = one per block of 32 rows, every SM): does a copy confined to a few SMs
hide behind the weight-bound compute, where one spread over all of them did not?
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


def configs(budget: int, chunks: list[int], lookaheads: list[str], overlap_off: bool,
            programs: list[int], hosts: list[str] = ("model",)) -> list[tuple[str, dict, bool]]:
    rows = [("full eager", {"policy": "full"}, False), ("full graph", {"policy": "full"}, True),
            ("evict graph", {"policy": "evict", "budget": budget}, True)]
    # Every offload row names its host store: OffloadKV's default is 8bit, and rows compared with each
    # other (eager vs graph, overlap on vs off) must hold the same one. The first of `hosts` is untagged.
    tag = lambda host: "" if host == hosts[0] else f"/{host}"  # noqa: E731
    for c in chunks:
        off = {"policy": "offload", "budget": budget, "chunk": c, "host": hosts[0]}
        rows.append((f"offload/chunk{c} eager", {**off, "lookahead": "none"}, False))  # profiled: kernel times
        for la in lookaheads:  # the program cap applies to overlapped copies only: not to "none"
            for n in programs if la != "none" else [0]:
                for host in hosts:
                    rows.append((f"offload/chunk{c}/{la}{f'/{n}prog' if n else ''}{tag(host)} graph",
                                 {**off, "lookahead": la, "copy_programs": n, "host": host}, True))
        if overlap_off:
            rows += [(f"offload/chunk{c}/{la} graph no-overlap", {**off, "lookahead": la, "overlap": False}, True)
                     for la in lookaheads if la != "none"]
    return rows


def kernel_ms(prof, steps: int) -> str:
    """Device time per token of the copy kernel and of the selection (scores, top-k + sort, the
    slot assignment kernel of kernels/slots.py)."""
    def ms(*names: str) -> float:
        return sum(e.self_device_time_total for e in prof.key_averages()
                   if any(n in e.key.lower() for n in names)) / (1e3 * steps)
    return (f" | copy kernels {ms('gather_rows'):.2f} ms, scores {ms('approx_scores'):.2f} ms, "
            f"top-k/sort {ms('topk', 'sort', 'radix'):.2f} ms, slot assignment {ms('_assign_kernel'):.2f} ms per token")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", default="32k,128k", help="prompt lengths, comma-separated (default 32k,128k)")
    p.add_argument("--budget", type=int, default=2048, help="tokens per layer for offload and evict (default 2048)")
    p.add_argument("--preset", default="llama-3.1-8b", help="random-weight model shapes (default llama-3.1-8b)")
    p.add_argument("--steps", type=int, default=41, help="decode steps; the first 8 are not timed (default 41)")
    p.add_argument("--chunks", default="1,16", help="OffloadKV chunk sizes to run, comma-separated (default 1,16)")
    p.add_argument("--lookahead", default="none", help="lookahead modes to run, comma-separated (default none)")
    p.add_argument("--overlap-off", action="store_true", help="also run the lookahead modes with the side stream off")
    p.add_argument("--copy-programs", default="0",
                   help="program caps for the overlapped copy, comma-separated; 0 = none (default 0)")
    p.add_argument("--host", default="model",
                   help="OffloadKV host stores to run, comma-separated: model, 8bit (default model; every row "
                        "names its store, the first one untagged)")
    a = p.parse_args()
    programs = [int(n) for n in a.copy_programs.split(",") if n.isdigit()]
    if len(programs) != len(a.copy_programs.split(",")):
        p.error(f"--copy-programs takes integers >= 0, got {a.copy_programs!r}")
    hosts = a.host.split(",")
    if not set(hosts) <= {"model", "8bit"}:
        p.error(f"--host takes model and/or 8bit, got {a.host!r}")
    if not torch.cuda.is_available():
        sys.exit("offload_gpu.py: error: needs a CUDA GPU")
    args = preset(a.preset)
    m = Llama.random(args, "cuda", torch.bfloat16)
    for T in (parse_tokens(c) for c in a.ctx.split(",")):
        ids = torch.randint(100, args.vocab_size, (T,), generator=torch.Generator().manual_seed(0)).tolist()
        rows = configs(a.budget, [int(c) for c in a.chunks.split(",")], a.lookahead.split(","), a.overlap_off,
                       programs, hosts)
        for name, spec, graphs in rows:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            # Copy-kernel time is read from a profile of 4 eager steps (graph replays hide kernels).
            prof = profile(activities=[ProfilerActivity.CUDA]) if name.endswith(" eager") and "offload" in name else None
            r = GenerationResult(len(ids))
            for done, _ in enumerate(stream_tokens(m, ids, a.steps, SamplingParams(), spec, r, cuda_graphs=graphs), 1):
                if prof is not None and done == 20:
                    prof.start()
                if prof is not None and done == 24:
                    torch.cuda.synchronize()
                    prof.stop()
            ms = 1e3 * statistics.median(r.decode_times_s[8:])
            kernels = "" if prof is None else kernel_ms(prof, 4)
            kv = r.kv_bytes()
            steps = len(r.decode_times_s) + 1  # the first generated token's step selects too
            moved = sum(p.transfer_bytes() for p in r.policies) / steps
            # bytes of the rows selected per step, as stored (fetcher.row_bytes: one head's K and V row)
            selected = sum(p.top * args.n_kv_heads * p.fetcher.row_bytes for p in r.policies
                           if getattr(p, "offloaded", False))
            reuse = f" reuse {1 - moved / selected:5.1%}" if selected else ""
            print(f"ctx {T} {name:36s} graph={r.cuda_graphs!s:5} prefill {r.prefill_s:6.2f} s decode {ms:6.2f} "
                  f"ms/token moved {moved / 2**20:6.1f} MiB/token{reuse} KV device {kv['device'] / 2**30:.2f} GiB host "
                  f"{kv['host'] / 2**30:.2f} GiB peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB{kernels}",
                  flush=True)
            del r


if __name__ == "__main__":
    main()
