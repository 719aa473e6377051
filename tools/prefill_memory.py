"""A prefill's peak memory per KV policy, measured exactly on the CPU, against the estimate the
up-front check refuses with (ModelArgs.prefill_bytes, LLM.check_kv_fits).

One layer of a model preset (random weights; a tiny vocabulary, so the embedding and the head are
negligible) prefills a prompt under engine/eval/live_bytes.LiveBytes, which counts the bytes of
every tensor torch creates, alive at each moment: the peak is exact, whatever the allocator does.
A whole model's prefill holds the same peak plus the caches of the layers before (the check adds
those, policy by policy). On a GPU (--device cuda, bfloat16) the peak is the caching allocator's
(max_memory_allocated, blocks rounded up) above what was allocated before; there the CUDA kernels
skip some temporaries (the fused silu * up, the Triton quantizers), so the estimate is a little high.

    python tools/prefill_memory.py --tokens 16k,32k                   # Llama-3.1-8B's layer, ~15 minutes
    python tools/prefill_memory.py --preset smollm2-135m --tokens 8k --policies full,quant:bits=2
    python tools/prefill_memory.py --device cuda --tokens 32k,128k    # tools/gpu_check.sh prefill

Budgets of evict and offload specs without one are --fraction of the prompt. On toy shapes (the
tiny preset) QuantKV's CPU quantizers, which work in slices of a fixed ~4 MB, exceed a prefill
chunk's activations (peak 1.1-1.24x the estimate, ~1.5 MiB); at real models' shapes they do not.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.cli import Parser, cli, parse_policies, parse_tokens, resolve_device  # noqa: E402
from engine.config import PRESETS, preset  # noqa: E402
from engine.eval.live_bytes import LiveBytes  # noqa: E402
from engine.kv import build_policies, parse_policy  # noqa: E402
from engine.model import Llama  # noqa: E402

POLICIES = "full,evict,offload:budget=2048,offload:chunk=16,quant:bits=4,quant:bits=2"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS), help="the layer's shapes")
    p.add_argument("--tokens", type=lambda t: [parse_tokens(x) for x in t.split(",")], default="16k",
                   help="prompt lengths, comma-separated (4096, 16k, ...)")
    p.add_argument("--policies", type=parse_policies, default=POLICIES,
                   help=f"KV policy specs, comma-separated (default {POLICIES})")
    p.add_argument("--fraction", type=float, default=0.2, help="evict/offload budget without one, of the prompt")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (query tokens)")
    p.add_argument("--device", default="cpu", help="cpu (exact live bytes) or cuda (the allocator's peak)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    return p


def peak_of(prefill, device: torch.device) -> tuple[int, int]:
    """(peak, kept) bytes of what prefill() allocates: exact live bytes on the CPU, the caching
    allocator's peak and what stays allocated on a GPU."""
    if device.type == "cpu":
        with LiveBytes() as lb:
            prefill()
        return lb.peak, lb.now
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    prefill()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, torch.cuda.memory_allocated(device) - base


def run(a) -> None:
    if not 0 < a.fraction <= 1 or a.chunk < 1:
        raise ValueError(f"--fraction must be in (0, 1] and --chunk >= 1, got {a.fraction}, {a.chunk}")
    device, dtype = resolve_device(a.device, a.dtype)
    args = preset(a.preset, vocab_size=256, n_layers=1)
    runs = []  # (T, spec), every spec built once here: bad values are refused before any work
    for T in a.tokens:
        for spec in map(parse_policy, a.policies):
            if spec["policy"] in ("evict", "offload") and "budget" not in spec:
                spec = {**spec, "budget": max(int(a.fraction * T), 512)}
            build_policies(args, spec, T + 1, device, dtype)
            runs.append((T, spec))
    model = Llama.random(args, device, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    print(f"{a.preset}, one layer, {str(dtype).removeprefix('torch.')} on {device}, chunk {a.chunk}: "
          f"peak MiB / estimate MiB (kept: what the cache holds after)")
    for T, spec in runs:
        policies = build_policies(args, spec, T + 1, device, dtype)
        tokens = torch.randint(0, 256, (1, T), device=device)
        start = time.time()
        peak, kept = peak_of(functools.partial(model.prefill, tokens, policies, chunk=a.chunk), device)
        est = args.prefill_bytes(T, elem, a.chunk)
        name = spec["policy"] + ":" + ",".join(f"{k}={v}" for k, v in spec.items() if k != "policy")
        print(f"{T:>7} {name.rstrip(':'):<28} peak {peak / 2**20:8.1f}  estimate {est / 2**20:8.1f}  kept "
              f"{kept / 2**20:7.1f}  peak/estimate {peak / est:.3f}  ({time.time() - start:.0f} s)", flush=True)
        del policies


if __name__ == "__main__":
    sys.exit(cli(build_parser(), run, sys.argv[1:]))
