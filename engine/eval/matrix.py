"""The order bench.py measures in: for each context, every policy's latency cell, every peer's, then
quality at each kept fraction for policies and peers together (one shared FullKV reference).
Cells are appended to results["cells"] as they finish, and `save()` is called after each, so a
run that dies (a GPU machine's time limit) still leaves every finished number behind."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial

from engine.eval import cells
from engine.eval import peers as peer_mod

FRACTION_FREE = ("full", "quant", "hf-dynamic", "hf-quanto4", "hf-quanto2")  # what a kept fraction does not change


def fraction_free(name: str) -> bool:
    """Also name:key=value specs and plan:PATH: they keep what they say, whatever the fraction."""
    return name in FRACTION_FREE or ":" in name


@dataclass
class Context:
    """What every cell of one context length shares."""
    m: object
    cfg: cells.BenchConfig
    ctx: int
    ids: list[int]   # the prompt
    cont: list[int]  # the teacher-forced continuation after it
    hf: object       # the transformers view of the model, or None when no peer runs
    log: object


def _cell(engine: str, policy: str, c: Context) -> dict:
    return {"engine": engine, "policy": policy, "ctx": c.ctx, "prompt_tokens": len(c.ids),
            "fraction": None if fraction_free(policy) else c.cfg.fractions[0], "status": "pending", "quality": None}


def _ours_latency(c: Context, name: str, specs: dict, cell: dict) -> dict:
    t = time.perf_counter()
    specs[name] = cells.policy_specs(name, c.m, c.ids, c.cfg.fractions[0], max(c.cfg.new_tokens, len(c.cont)))
    if name == "hybrid":
        cell["plan_s"] = time.perf_counter() - t  # the profiling pass + planning, before the run
        # The profile holds a FullKV of its (cut) prompt: its peak is not the plan's. Kept apart, and
        # the cell's peak restarts for the run itself (what must fit the card).
        device = c.m.model.head.device
        cell["plan_peak_memory_bytes"] = cells.peak_memory(device)[0]
        cells.release(device)
    return cells.latency_cell(c.m, c.ids, specs[name], c.cfg)


def _ours_quality(c: Context, specs: dict, names: list[str], f: float, out: dict) -> dict:
    """A policy that cannot be built at f (no hybrid plan fits a small fraction) gets its own error
    row; the others, and the FullKV reference the peers are compared with, are measured anyway."""
    todo, failed = {}, {}
    for k in names:
        try:  # planned for the new tokens the latency cell planned for: one plan per fraction
            todo[k] = specs.get(k) or cells.policy_specs(k, c.m, c.ids, f, max(c.cfg.new_tokens, len(c.cont)))
        except ValueError as e:
            failed[k] = {"error": str(e)}
    out["ours"], out["ref"] = cells.quality_cells(c.m, c.ids, c.cont, todo, f, c.cfg, c.log)
    out["ours"].update(failed)
    return {}


def _peer_quality(c: Context, peer: str, ref: dict, f: float, out: dict) -> dict:
    out.update(peer_mod.quality_cell(c.hf, peer, c.m.tokenizer, ref, f, c.cfg))
    return {}


def run_matrix(m, cfg: cells.BenchConfig, peers: list[str], results: dict, save, log) -> None:
    device = m.model.head.device
    skips = {p: peer_mod.skip_reason(p) for p in peers}
    hf = None
    if any(r is None for r in skips.values()):
        from engine.eval.hf_view import hf_view
        hf = hf_view(m.model)
    quality = cfg.quality and not cells.is_random(m)
    if cfg.quality and not quality:
        results["meta"]["quality_note"] = ("Quality skipped: random weights (random: presets) have no meaningful "
                                           "pass key or perplexity; this run measures speed and memory at real shapes.")
    if cfg.warm_up:
        warm_up(m, cfg, [p for p in peers if not skips[p]], hf, log)
    for ctx in cfg.ctxs:
        n = cells.prompt_len(m, ctx, max(cfg.new_tokens, cfg.continuation))
        ids = cells.text_ids(m, n + cfg.continuation)
        c = Context(m, cfg, ctx, ids[:n], ids[n:], hf, log)
        log(f"context {ctx}: {n}-token prompt")
        specs, by_name = {}, {}  # cells of this context, by policy or peer
        for name in cfg.policies:
            cell = by_name[name] = _cell("layerkv", name, c)
            cells.guarded(cell, device, partial(_ours_latency, c, name, specs, cell), log)
            _done(cell, results, save, log)
        for peer in peers:
            engine = "kvpress" if peer.startswith("kvpress-") else "transformers"
            cell = by_name[peer] = _cell(engine, peer.removeprefix("kvpress-"), c)
            if skips[peer]:
                cell.update(status="skipped", reason=skips[peer])
            else:
                cells.guarded(cell, device, partial(peer_mod.latency_cell, hf, peer, c.ids, cfg.fractions[0], cfg), log)
            _done(cell, results, save, log)
        if quality:
            for f in cfg.fractions:
                _quality_at(c, f, specs if f == cfg.fractions[0] else {}, by_name,
                            [p for p in peers if not skips[p]], results, device)
                save()


def warm_up(m, cfg: cells.BenchConfig, peers: list[str], hf, log, n: int = 256) -> None:
    """Run every policy and peer once on a short prompt, unreported: the first call of each pays
    for Triton compilation, cuBLAS heuristics and allocator growth, which would otherwise land in
    whichever cell happens to come first (seconds on a GPU). At half the prompt or more: a hybrid
    plan for n tokens cannot go below every layer's floor (a 10% plan of 256 tokens was refused)."""
    device = m.model.head.device
    short = replace(cfg, steps=2, warmup=0, fractions=[max(f, 0.5) for f in cfg.fractions])
    ids = cells.text_ids(m, n + 8)
    c = Context(m, short, n, ids[:n], ids[n:], hf, lambda _: None)
    t = time.perf_counter()
    for name in cfg.policies:
        cells.guarded(_cell("layerkv", name, c), device, partial(_ours_latency, c, name, {}, {}), c.log)
    for peer in peers:
        cells.guarded(_cell(peer, peer, c), device,
                      partial(peer_mod.latency_cell, hf, peer, c.ids, short.fractions[0], short), c.log)
    log(f"warm-up: every policy and peer once on {n} tokens in {time.perf_counter() - t:.1f} s (not reported)")


def _quality_at(c: Context, f: float, specs: dict, by_name: dict, peers: list[str], results: dict, device) -> None:
    """Quality at kept fraction f: our policies (one shared prefill per prompt), then each peer
    against the same FullKV reference. Fraction-free entries are measured at the first only."""
    first = f == c.cfg.fractions[0]
    names = [k for k in c.cfg.policies if k in by_name and (first or not fraction_free(k))]
    out: dict = {}
    probe = {"engine": "layerkv", "policy": "quality", "ctx": c.ctx}
    cells.guarded(probe, device, partial(_ours_quality, c, specs, names, f, out), c.log)
    for k in names:
        _quality(results, by_name[k], f, first, out["ours"][k] if "ours" in out else {"error": probe["reason"]})
    if "ref" not in out:
        return
    for peer in peers:
        if not first and fraction_free(peer):
            continue
        row: dict = {}
        probe = {"engine": peer, "policy": "quality", "ctx": c.ctx}
        cells.guarded(probe, device, partial(_peer_quality, c, peer, out["ref"], f, row), c.log)
        _quality(results, by_name[peer], f, first, row if probe["status"] == "ok" else {"error": probe["reason"]})
        if row:
            c.log(f"  quality {peer} @ {f}: pass key {row['passkey_found']}/{row['passkey_trials']}, KL {row['kl']:.4f}")


def _quality(results: dict, cell: dict, f: float, first: bool, row: dict) -> None:
    results["sweep"].append({"engine": cell["engine"], "policy": cell["policy"], "ctx": cell["ctx"],
                             "fraction": f, "quality": row})
    if first:
        cell["quality"] = row


def _done(cell: dict, results: dict, save, log) -> None:
    results["cells"].append(cell)
    save()
    if cell["status"] == "ok":
        log(f"  {cell['engine']} {cell['policy']}: prefill {cell['prefill_s']:.2f} s, decode "
            f"{cell['decode_ms_per_token']:.1f} ms/token, KV {cell['kv_ratio']:.3f} of FullKV, "
            f"peak {cell['peak_memory_bytes'] / 2**20:.0f} MiB")
    elif cell["status"] == "skipped":
        log(f"  {cell['engine']} {cell['policy']}: skipped ({cell['reason']})")
