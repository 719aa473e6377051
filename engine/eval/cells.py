"""bench.py's harness: every cell of the policies x context-lengths matrix, for this engine's KV
policies, measured the same way: latency (prefill, median decode step after warm-up), memory (KV
bytes by tier, FullKV bytes, peak device memory) and quality against FullKV on the same prompts.

A cell is a plain dict (the JSON row). A cell that fails (out of memory, a bad parameter) records
its error and the matrix goes on: at 128k one policy's OOM must not lose the others' numbers.
"""
from __future__ import annotations

import ctypes
import gc
import os
import random
import time
import traceback
from dataclasses import dataclass, field

import torch

from engine.eval.haystack import FILLER, make_haystack
from engine.eval.quality import fidelity_with_reference, passkey_grid
from engine.kv.evict import BudgetedEvictKV
from engine.kv.offload import OffloadKV
from engine.runner import generate
from engine.sampling import SamplingParams

OUR_POLICIES = ("full", "quant", "evict", "offload", "hybrid")
TEXT = "/usr/share/common-licenses/GPL-3"  # long natural English on any Debian machine


@dataclass
class BenchConfig:
    ctxs: list[int]
    policies: list[str]
    fractions: list[float]         # kept-KV fractions; the latency matrix uses the first
    steps: int = 16                # timed decode steps per cell (the median is reported)
    warmup: int = 2                # decode steps run before timing starts
    depths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    seeds: int = 1                 # pass keys per depth
    continuation: int = 64         # teacher-forced tokens for KL / top-1 / perplexity
    quality: bool = True
    warm_up: bool = True           # run every policy and peer once, unreported, before the matrix

    @property
    def new_tokens(self) -> int:  # what a latency cell generates: first token + warm-up + timed
        return 1 + self.warmup + self.steps


# ---- model and prompts ---------------------------------------------------------------------------
def is_random(m) -> bool:
    return m.name.startswith("random:")


def text_ids(m, n: int) -> list[int]:
    """n tokens of real text (GPL-3, repeated if short), or seeded random ids for random weights."""
    if is_random(m):
        rng = random.Random(0)
        return [rng.randrange(100, m.args.vocab_size) for _ in range(n)]
    text = FILLER * 2000
    if os.path.exists(TEXT):
        with open(TEXT) as f:
            text = f.read()
    ids = m.tokenizer.encode(text)
    while len(ids) < n:  # a short text is repeated: still real language
        ids = ids + ids
    return ids[:n]


def prompt_len(m, ctx: int, new: int) -> int:
    """The prompt fits the model's context with `new` tokens after it (SmolLM2 stops at 8192)."""
    return max(1, min(ctx, m.args.max_seq_len - new))


# ---- policy specs at one kept fraction -------------------------------------------------------------
def policy_specs(name: str, m, ids: list[int], fraction: float, new: int) -> dict | list[dict]:
    """`name` at `fraction` of the context: evict/offload keep that many prompt tokens per layer,
    hybrid gets that fraction of FullKV's device bytes (a plan from a profiling pass over `ids`),
    quant is 4-bit whatever the fraction (its bytes follow from the bits)."""
    budget = max(1, int(fraction * len(ids)))
    if name == "full":
        return {"policy": "full"}
    if name == "quant":
        return {"policy": "quant", "bits": 4}
    if name == "evict":  # at least its query window
        return {"policy": "evict", "budget": max(budget, BudgetedEvictKV.defaults()["window"])}
    if name == "offload":  # at least its sink + recent tokens
        d = OffloadKV.defaults()
        return {"policy": "offload", "budget": max(budget, d["sink"] + d["recent"])}
    if name == "hybrid":  # as generate.py --policy hybrid: profile this prompt, plan for the fraction
        return m.policy_specs("hybrid", ids, new, kv_budget=fraction)
    if ":" in name:  # name:key=value or plan:PATH
        return m.policy_specs(name)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(OUR_POLICIES)}, name:key=value or plan:PATH")


# ---- memory ------------------------------------------------------------------------------------------
def release(device: torch.device) -> None:
    """Free what the last cell left: Python garbage, the CUDA caching allocator's blocks, and on CPU
    glibc's free lists, so the next cell's peak starts from the weights, not from leftovers."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:  # Linux >= 4.0: "5" resets the process's peak RSS (VmHWM) to its current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are). CUDA: max allocated since the cell began (weights included).
    CPU: the process's peak resident memory since the cell began (weights, activations, KV in both
    tiers: host memory *is* the device); if the kernel cannot reset the peak, the process peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "rss_peak_since_cell_start"
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_peak_of_process"


def guarded(cell: dict, device: torch.device, fn, log) -> dict:
    """Run fn() -> fields (status "ok" unless they say otherwise, e.g. "skipped"); on failure the
    cell says why (first line), and memory is freed."""
    release(device)
    try:
        cell.update({"status": "ok", **fn()})
    except Exception as e:  # noqa: BLE001 -- one cell's failure (often OOM) must not end the matrix
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        cell.update(status="error", reason=f"{type(e).__name__}: {msg}"[:300])
        log(f"  {cell['engine']} {cell['policy']} @ {cell['ctx']}: {cell['reason']}")
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
    release(device)
    return cell


# ---- this engine's cells ------------------------------------------------------------------------------
def latency_fields(prefill_s: float, step_s: list[float], kv: dict, full: int, peak: tuple[int, str]) -> dict:
    """The latency and memory fields every engine's cell reports, the same way."""
    step_s = sorted(step_s)
    return {"prefill_s": prefill_s, "decode_ms_per_token": 1000 * step_s[len(step_s) // 2],
            "decode_steps": len(step_s), "kv_bytes": kv, "full_kv_bytes": full,
            "kv_ratio": kv["device"] / full, "peak_memory_bytes": peak[0], "peak_memory_kind": peak[1]}


def check_fits(m, specs: list, prompt: int, new: int) -> list[list[dict]]:
    """generate.py's up-front memory check for each of `specs` (run one at a time): a cell that
    cannot fit fails in one line before its prefill, instead of after it on a GPU (at 128k on the
    H100, ~15 s of prefill) or, on a CPU, by the kernel's OOM killer ending the whole bench.
    -> each spec as one spec per layer."""
    layers = [m.policy_specs(spec) for spec in specs]
    for one in layers:
        m.check_kv_fits([(one, prompt, new)])
    return layers


def latency_cell(m, ids: list[int], specs, cfg: BenchConfig) -> dict:
    """Prefill `ids`, decode cfg.new_tokens greedily; the first cfg.warmup steps are not timed."""
    [layers] = check_fits(m, [specs], len(ids), cfg.new_tokens)
    res = generate(m.model, ids, cfg.new_tokens, SamplingParams(), specs)
    elem = m.model.head.element_size()
    full = m.args.kv_bytes_per_token(elem) * (len(ids) + cfg.new_tokens)
    out = latency_fields(res.prefill_s, res.decode_times_s[cfg.warmup:], res.kv_bytes(), full,
                         peak_memory(m.model.head.device))
    kinds: dict[str, int] = {}
    for p in res.policies:
        kinds[p.name] = kinds.get(p.name, 0) + 1
    out["layers"] = kinds  # e.g. {"evict": 12, "offload": 10, "full": 8} for a hybrid plan
    out["cuda_graphs"] = bool(getattr(res, "cuda_graphs", False))  # decode replayed from a CUDA graph
    if m.model.head.device.type == "cuda":  # what --gpu-memory's cap limits: the allocator's reserved bytes
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(m.model.head.device)
        # what the up-front check (engine/fit.py) expects at the peak, beside the measured one: the
        # weights, every layer's cache, and the prefill's own peak (a hybrid's profiling pass aside)
        out["peak_estimate_bytes"] = (m.args.n_params() * elem + m.kv_footprint(layers, len(ids),
                                      cfg.new_tokens) + m.args.prefill_bytes(len(ids), elem))
    return out


def quality_cells(m, ids: list[int], cont: list[int], specs: dict, fraction: float, cfg: BenchConfig,
                  log) -> tuple[dict, dict]:
    """Quality of every policy in `specs` ({name: spec}) against FullKV: teacher-forced over `cont`
    after the prompt `ids`, and pass-key haystacks of len(ids) tokens -> ({name: fields}, reference),
    the reference being what the peers are compared with (prompt, continuation, FullKV's logits).
    hybrid is planned per prompt, as generate.py --policy hybrid does: its KL uses the plan made
    from `ids`, and each haystack gets a plan from its own profiling pass."""
    names = list(specs)
    check_fits(m, ["full"] + [specs[n] for n in names], len(ids), len(cont))  # FullKV: the reference
    t = time.perf_counter()
    ref, fids = fidelity_with_reference(m.model, ids, cont, [specs[n] for n in names])
    log(f"  quality: teacher-forced {len(cont)} tokens x {len(names) + 1} policies in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    shared = [n for n in names if n != "hybrid"]
    grids = dict(zip(shared, passkey_grid(m.model, m.tokenizer, len(ids), cfg.depths, list(range(cfg.seeds)),
                                          [specs[n] for n in shared])))
    if "hybrid" in specs:
        grids["hybrid"] = []
        for seed in range(cfg.seeds):
            for depth in cfg.depths:
                h = make_haystack(m.tokenizer, len(ids), depth=depth, seed=seed)
                spec = policy_specs("hybrid", m, h.ids, fraction, 8)
                grids["hybrid"] += passkey_grid(m.model, m.tokenizer, len(ids), [depth], [seed], [spec])[0]
    log(f"  quality: pass key, {len(cfg.depths) * cfg.seeds} haystacks x {len(names)} policies in "
        f"{time.perf_counter() - t:.0f} s")
    out = {}
    for name, f in zip(names, fids):
        rows = grids[name]
        out[name] = passkey_fields([r["found"] for r in rows], [r["answer"] for r in rows])
        out[name].update(kl=f.kl, top1=f.top1, ppl=f.ppl, ppl_full=f.ppl_full, h2d_bytes_per_token=f.h2d_bytes_per_token)
    return out, {"prompt": ids, "continuation": cont, "full_logits": ref}


def passkey_fields(found: list[bool], answers: list[str]) -> dict:
    return {"passkey_found": sum(found), "passkey_trials": len(found), "passkey_acc": sum(found) / len(found),
            "passkey_answers": answers}
