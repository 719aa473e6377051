"""Does a run fit? The memory checks LLM makes before any expensive work, each refusing in one line.

A run's caches are priced by their policies (engine/kv: `spec_cost`, what each policy's `nbytes`
will say, tested equal), per tier: the device (GPU memory, or RAM on a CPU) and the host (OffloadKV's
store: pinned RAM beside a GPU, which cannot swap). A prompt's prefill needs, besides the caches,
its own peak (ModelArgs.prefill_bytes: residual stream, RoPE tables, one layer's full K/V and one
query chunk's activations; the policies' temporaries stay below the chunk's, measured to 0.1% with
tools/prefill_memory.py). Worked example, Llama-3.1-8B in bfloat16, a 128k prompt, the hybrid at
10% of FullKV on a 24 GiB card: 15 GiB of weights leave ~8.5 GiB (less what the CUDA context
takes); the caches' device bytes (the offloaded layers' sketches included) are 1.6 GiB and the
prefill's peak 1.56 + 0.26 GiB beside them: it fits, ~5 GiB to spare. FullKV's 16 GiB does not.
"""
from __future__ import annotations

import torch

from engine.cli import fmt_bytes, free_memory
from engine.config import ModelArgs
from engine.kv import spec_cost
from kernels.host_store import pinned_bytes, release_pinned_cache

Run = tuple[list[dict], int, int]  # (one spec per layer, prompt tokens, new tokens): one sequence


def kv_tiers(args: ModelArgs, device: torch.device, elem: int, runs: list[Run]) -> dict[str, int]:
    """{"device", "host", "pinned"} bytes the caches of `runs` take together, as their policies
    price themselves (pinned: the host bytes as torch's pinned allocator rounds them). On a CPU
    host memory is the device: the host bytes count on the device too."""
    costs = [spec_cost(args, s, prompt, new, elem) for specs, prompt, new in runs for s in specs]
    host = sum(c["host"] for c in costs)
    return {"device": sum(c["device"] for c in costs) + (host if device.type == "cpu" else 0), "host": host,
            "pinned": sum(pinned_bytes(c["host"]) for c in costs)}


def check_kv_fits(args: ModelArgs, device: torch.device, elem: int, runs: list[Run], prefill_chunk: int = 2048) -> None:
    """ValueError, in one line, when the caches of `runs` cannot fit the free memory together, or
    a prompt's prefill (in query chunks of prefill_chunk) cannot run beside them, or OffloadKV's
    stores cannot be pinned in the host memory available."""
    tiers = [kv_tiers(args, device, elem, [run]) for run in runs]  # each sequence's caches
    need = {tier: sum(t[tier] for t in tiers) for tier in ("device", "pinned")}
    free = free_memory(device)
    what = (f"{runs[0][1]} + {runs[0][2]} tokens" if len(runs) == 1 else
            f"{len(runs)} sequences ({sum(r[1] + r[2] for r in runs)} tokens in all)")
    hint = "a smaller --ctx or budget, fewer prompts, or another policy would fit"
    if need["device"] > free:
        raise ValueError(f"the KV cache for {what} needs {fmt_bytes(need['device'])} on {device}; "
                         f"{fmt_bytes(free)} is free ({hint})")
    # Sequences prefill one at a time, each beside the caches of those before it and its own:
    # the peak is the worst such moment, with the prefill's own peak on top.
    held, peak, worst = 0, 0, 0
    for (_, prompt, _), t in zip(runs, tiers):
        held += t["device"]
        transient = args.prefill_bytes(prompt, elem, prefill_chunk)
        if held + transient > peak:
            peak, worst = held + transient, transient
    if peak > free:
        raise ValueError(f"the KV cache for {what} and a prefill beside it need {fmt_bytes(peak)} on "
                         f"{device} at the peak, {fmt_bytes(worst)} of it the prefill's own (residual "
                         f"stream, one layer's full K/V, one chunk's activations); {fmt_bytes(free)} is "
                         f"free ({hint})")
    if device.type != "cpu":  # OffloadKV's store is pinned host memory, which cannot swap
        free_host = free_memory(torch.device("cpu"))
        if need["pinned"] > free_host:  # short: give back what earlier stores (a hybrid's calibration)
            release_pinned_cache()  # left in torch's host cache (otherwise it is reused, not re-pinned)
            free_host = free_memory(torch.device("cpu"))
        if need["pinned"] > free_host:
            raise ValueError(f"the offloaded KV for {what} needs {fmt_bytes(need['pinned'])} of host memory; "
                             f"{fmt_bytes(free_host)} is available (a smaller --ctx, fewer prompts or fewer "
                             f"offloaded layers would fit; host=8bit takes half of bfloat16's)")


def profile_limit(args: ModelArgs, device: torch.device, elem: int) -> int:
    """The longest prompt a profiling pass profiles whole: its cache is a FullKV of every layer,
    so the prompt's FullKV must fit in half the free device memory (the rest for the prefill's
    activations); at least 4096 tokens. E.g. Llama-3.1-8B bf16 (128 KiB per token) on a 24 GB
    card with ~8 GiB free: 32k tokens; on an 80 GB H100: a whole 128k prompt. Longer prompts lose
    their middle (runner.fit_prompt), and with it whatever the middle held: at 8k on the default
    model a 4096-token profile dropped the pass key and the plan then lost it (1/3 -> 3/3 whole)."""
    return max(4096, free_memory(device) // 2 // args.kv_bytes_per_token(elem))
