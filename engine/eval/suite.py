"""bench.py --suite: RULER-style long-context tasks (engine/eval/tasks.py) for every KV method at
several kept fractions, scored two ways:
  accuracy   the share of the task's expected answers in the greedy output;
  agreement  whether the greedy answer equals FullKV's on the same prompt (Task.answer_key of
             both: as many items as the task asks for, formatting aside). The default 135M model
             misses multi-key retrieval even with the full cache; what a KV method must preserve
             is FullKV's answer, right or wrong.

Our policies at all fractions share one prefill per prompt (quality.shared_prefill: the prompt's
forward pass does not depend on the policy), then decode one by one. The hybrid is planned per
prompt, as generate.py --policy hybrid does: one profiling pass per prompt, one plan per fraction.
Peers (transformers' caches, kvpress presses) run their own prefill per prompt and fraction.

A method whose memory does not follow the kept fraction (FullKV, QuantKV, transformers'
DynamicCache / QuantizedCache) runs once per prompt; every row records the device KV it actually
held as a fraction of FullKV's, which is where the plot puts it.
"""
from __future__ import annotations

import time

import torch

from engine.eval import peers as peer_mod
from engine.eval.cells import policy_specs
from engine.eval.quality import greedy, shared_prefill
from engine.eval.tasks import make_task

FIXED = ("full", "quant", "hf-dynamic", "hf-quanto4", "hf-quanto2")  # memory independent of the fraction


def fixed(name: str) -> bool:
    """True for a method whose kept memory does not follow the fraction (plain specs such as
    quant:bits=2 and plan:PATH included)."""
    return name in FIXED or ":" in name


def our_specs(m, names: list[str], fractions: list[float], ids: list[int], new: int, log) -> list[tuple]:
    """(name, fraction or None, spec) for every policy and fraction; the hybrid profiles `ids` once."""
    out, stats = [], None
    for name in names:
        if fixed(name):
            out.append((name, None, policy_specs(name, m, ids, fractions[0], new)))
            continue
        for f in fractions:
            if name == "hybrid":
                try:  # a fraction below every layer's cheapest option (the floor) has no plan: no row
                    m.check_budget(f, len(ids), new)
                except ValueError as e:
                    log(f"  hybrid @ {f}: no plan ({e})")
                    continue
                if stats is None:
                    stats = m.profile([ids], profile_tokens=None)
                out.append((name, f, m.plan(stats=stats, kv_budget=f, context=len(ids), new_tokens=new).specs))
            else:
                out.append((name, f, policy_specs(name, m, ids, f, new)))
    return out


@torch.inference_mode()
def ours(m, task, names: list[str], fractions: list[float], log) -> list[dict]:
    """Greedy answers of every policy at every fraction on one task prompt."""
    todo = our_specs(m, names, fractions, task.ids, task.max_new_tokens, log)
    first, per_spec = shared_prefill(m.model, task.ids, [spec for _, _, spec in todo], task.max_new_tokens)
    full_bytes = m.full_kv_bytes(len(task.ids) + task.max_new_tokens)
    rows = []
    for i, (name, f, _) in enumerate(todo):
        policies = per_spec[i]
        ids = greedy(m.model, policies, first, len(task.ids), task.max_new_tokens, m.tokenizer.eos_ids)
        held = sum(p.nbytes()["device"] for p in policies)
        rows.append(_row("layerkv", name, f, task, _text(m.tokenizer, ids), held / full_bytes))
        per_spec[i] = None  # free this cache before the next one decodes
    return rows


def peer(hf, name: str, tok, task, fractions: list[float]) -> list[dict]:
    """One peer's greedy answers on one task prompt, at every fraction (once if it has none)."""
    cfg = hf.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * next(hf.parameters()).element_size()
    rows = []
    for f in ([None] if fixed(name) else fractions):
        ids, held = peer_mod.greedy(hf, name, task.ids, f or 1.0, task.max_new_tokens, tok.eos_ids)
        engine = "kvpress" if name.startswith("kvpress-") else "transformers"
        rows.append(_row(engine, name.removeprefix("kvpress-"), f, task, _text(tok, ids),
                         held / (per_token * (len(task.ids) + task.max_new_tokens))))  # as ours(): FullKV of both
    return rows


def _text(tok, ids: list[int]) -> str:
    """The answer's text, without the end-of-turn token that stopped it."""
    return tok.decode(ids[:-1] if ids and ids[-1] in tok.eos_ids else ids)


def _row(engine: str, policy: str, f: float | None, task, text: str, kv_ratio: float) -> dict:
    return {"engine": engine, "policy": policy, "fraction": f, "task": task.name, "score": task.score(text),
            "answer": text, "kv_ratio": kv_ratio}


def run_suite(m, hf, ctx: int, tasks: list[str], seeds: int, names: list[str], peers: list[str],
              fractions: list[float], results: dict, save, log) -> None:
    """Every task x seed at `ctx` tokens: our policies, then each peer; rows appended to
    results["suite"] (with agreement against FullKV's answer on the same prompt) and saved."""
    if "full" not in names:
        names = ["full"] + names  # the reference every agreement is measured against
    for seed in range(seeds):
        for name in tasks:
            task = make_task(name, m.tokenizer, ctx, seed)
            t = time.perf_counter()
            rows = ours(m, task, names, fractions, log)
            for p in peers:
                rows += peer(hf, p, m.tokenizer, task, fractions)
            ref = task.answer_key(next(r["answer"] for r in rows if r["engine"] == "layerkv" and r["policy"] == "full"))
            for r in rows:
                r.update(ctx=ctx, seed=seed, agree=task.answer_key(r["answer"]) == ref)
            results["suite"] += rows
            save()
            full = next(r for r in rows if r["policy"] == "full")
            log(f"  suite {name} seed {seed} @ {ctx}: FullKV {full['score']:.2f} "
                f"({task.answer_key(full['answer'])!r}), {len(rows)} answers in {time.perf_counter() - t:.0f} s")


def run_suite_all(m, cfg, tasks: list[str], peers: list[str], results: dict, save, log) -> None:
    """The suite at every context; peers that cannot run here are noted in the results and skipped."""
    skips = {p: peer_mod.skip_reason(p) for p in peers}
    results["meta"]["skipped_peers"] = {p: r for p, r in skips.items() if r}
    for p, r in results["meta"]["skipped_peers"].items():
        log(f"  {p}: skipped ({r})")
    runnable = [p for p in peers if not skips[p]]
    hf = None
    if runnable:
        from engine.eval.hf_view import hf_view
        hf = hf_view(m.model)
    for ctx in cfg.ctxs:
        n = min(ctx, m.args.max_seq_len - 64)  # room for the longest answer
        log(f"suite at {n} tokens: {len(tasks)} tasks x {cfg.seeds} seed(s), fractions {cfg.fractions}")
        run_suite(m, hf, n, tasks, cfg.seeds, cfg.policies, runnable, cfg.fractions, results, save, log)


def summary(rows: list[dict]) -> list[dict]:
    """Mean accuracy and agreement per (ctx, engine, policy, fraction), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["ctx"], r["engine"], r["policy"], r["fraction"]), []).append(r)
    out = []
    for (ctx, engine, policy, f), rs in groups.items():
        out.append({"ctx": ctx, "engine": engine, "policy": policy, "fraction": f, "n": len(rs),
                    "accuracy": sum(r["score"] for r in rs) / len(rs), "agreement": sum(r["agree"] for r in rs) / len(rs),
                    "kv_ratio": sum(r["kv_ratio"] for r in rs) / len(rs),
                    "by_task": {t: sum(r["score"] for r in rs if r["task"] == t) / sum(r["task"] == t for r in rs)
                                for t in dict.fromkeys(r["task"] for r in rs)}})
    return out
