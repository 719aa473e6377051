"""How much of the attention does OffloadKV's selection keep, under each kind of key sketch?

OffloadKV ranks the middle of the prompt by approximate scores from an on-device sketch of the keys
and attends over the top `budget` tokens. A token it leaves out is attention mass lost. This tool
decodes suite prompts with FullKV, records every layer's prompt keys and every decode query, and
for each (layer, step, query head) measures the share of the middle's softmax mass that lands on
the tokens a sketch selects, against the best any selection can do (the exact top-k by q.k). It
isolates the ranking from everything else: every sketch sees the same queries.

Sketches (comma-separated in --sketches):
  exact      the exact q.k (the ceiling)
  float:C    the C channels OffloadKV ranks first (mean|q| x max|K|), values as they are (the sketch
             before 2026-11-29: 8 channels in the model's dtype)
  8bit:C     those C channels on an 8-bit grid per channel, rounded to the nearest code
  4bit:C     the engine's sketch: kernels/sparse_attn.make_sketch and sketch_scores, 4-bit codes
  mean:C     chunks only: the mean key of each chunk at those C channels as 4-bit codes (ShadowKV's
             "landmarks"), scored by q . mean; at chunk 1 it is 4bit:C

    python tools/sketch_mass.py --ctx 4k --fraction 0.2 --json mass.json

With --chunk c the selection is OffloadKV's chunk=c: whole chunks of c tokens, ranked by the
sketch's chunk score (4bit: Quest's bound from each chunk's min and max; exact, float and 8bit: the
largest token score in the chunk), and the mass kept is that of the chosen chunks.

Per token and KV head a sketch of C channels costs C x 4 bytes in float32, C x 2 in bfloat16, C
bytes at 8 bits and C / 2 at 4 bits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.cli import Parser, check_writable, cli, parse_tokens  # noqa: E402
from engine.eval.tasks import TASKS  # noqa: E402


def sketch_kind(text: str) -> tuple[str, int]:
    kind, _, c = text.partition(":")
    if kind == "exact" and not c:
        return kind, 0
    if kind not in ("float", "8bit", "4bit", "mean") or not c.isdigit() or int(c) < 1:
        raise argparse.ArgumentTypeError(f"not a sketch: {text!r} (exact, float:C, 8bit:C, 4bit:C or mean:C)")
    return kind, int(c)


def scorer(kind: str, C: int, mid_k: torch.Tensor, q_window: torch.Tensor, chunk: int = 1):
    """mid_k (1, H_kv, M, D) the prompt's middle keys (M a multiple of chunk), q_window its last
    queries -> a function of the decode queries (1, H_kv, n_rep, D) giving scores (1, H_kv, n_rep,
    M // chunk) to rank the middle's chunks by."""
    from engine.kv.offload import rank_channels
    from kernels.sparse_attn import make_sketch, sketch_scores
    per_chunk = lambda s: s.unflatten(-1, (-1, chunk)).amax(-1)  # noqa: E731  token scores -> chunk scores
    if kind == "exact":
        return lambda qg: per_chunk(qg @ mid_k.transpose(-1, -2))
    chan = rank_channels(mid_k, q_window, C)  # (1, H_kv, C)
    pick = lambda x: x.gather(-1, chan[:, :, None, :].expand(*x.shape[:-1], -1))  # noqa: E731
    if kind == "4bit":
        sk = make_sketch(mid_k, chan, chunk)
        return lambda qg: sketch_scores(pick(qg), sk)
    if kind == "mean":  # the chunk means through make_sketch at chunk 1: the same 4-bit grid
        sk = make_sketch(mid_k.unflatten(2, (-1, chunk)).mean(3), chan, 1)
        return lambda qg: sketch_scores(pick(qg), sk)
    kc = pick(mid_k)  # (1, H_kv, M, C)
    if kind == "8bit":
        lo, hi = kc.amin(2, keepdim=True), kc.amax(2, keepdim=True)
        step = ((hi - lo) / 255).clamp(min=1e-12)
        kc = torch.floor((kc - lo) / step + 0.5) * step + lo
    return lambda qg: per_chunk(pick(qg) @ kc.transpose(-1, -2))


def recorder_class():
    """A FullKV layer that also keeps what the measurement needs: the prompt's keys, its last
    queries and every decode query (a subclass, so the engine needs no hook; made here because the
    engine is imported only after the arguments are checked)."""
    from engine.kv.full import FullKV

    class _Recorder(FullKV):
        q_window = 32  # OffloadKV's: the queries it ranks channels by
        graphable = False  # attend() records on the host: every step eager (a graph would replay without it)

        def prefill(self, k, v, q_window=None):
            super().prefill(k, v, q_window)
            self.prompt_k, self.q_prompt, self.queries = k.float().clone(), q_window.float().clone(), []

        def attend(self, q, k_new, v_new, pos):
            self.queries.append(q.float().clone())
            return super().attend(q, k_new, v_new, pos)
    return _Recorder


def layer_masses(rec, sketches, sink: int, recent: int, fraction: float, chunk: int = 1) -> list[float]:
    """Mean captured mass per sketch for one layer of one prompt (over steps and query heads)."""
    from engine.kv.offload import OffloadKV
    k = rec.prompt_k  # (1, H_kv, T, D)
    _, H_kv, T, D = k.shape
    # OffloadKV's split, with the budget the suite gives it (int(f x T) tokens)
    S, M, _, top = OffloadKV.layout(T, int(fraction * T), sink, recent, chunk)
    mid = k[:, :, S:S + M]  # the middle it ranks
    fns = [scorer(kind, C, mid, rec.q_prompt, chunk) for kind, C in sketches]
    totals = [0.0] * len(sketches)
    for q in rec.queries:  # (1, H, 1, D)
        qg = q.reshape(1, H_kv, -1, D)  # (1, H_kv, n_rep, D)
        p = (qg @ mid.transpose(-1, -2) / D ** 0.5).softmax(-1)  # (1, H_kv, n_rep, M) the middle's mass
        p = p.unflatten(-1, (-1, chunk)).sum(-1)  # (1, H_kv, n_rep, M // chunk) per chunk
        for i, fn in enumerate(fns):
            chosen = fn(qg).amax(2).topk(top // chunk, -1).indices  # one selection per KV head, as OffloadKV's
            totals[i] += p.gather(-1, chosen[:, :, None, :].expand(-1, -1, p.shape[2], -1)).sum(-1).mean().item()
    return [t / len(rec.queries) for t in totals]


def task_names(text: str) -> list[str]:
    names = text.split(",")
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown task {bad[0]!r} ({', '.join(TASKS)})")
    return names


def fraction(text: str) -> float:
    f = float(text)
    if not 0 < f < 1:
        raise argparse.ArgumentTypeError(f"a share of the prompt in (0, 1), got {text}")
    return f


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {text!r}")
    return int(text)


def run(a: argparse.Namespace) -> int:
    check_writable(a.json, "--json")
    from engine import LLM
    from engine.eval.quality import greedy
    from engine.eval.tasks import make_task
    from engine.kv.offload import OffloadKV
    llm = LLM(log=lambda m: print(m, file=sys.stderr))
    Rec = recorder_class()
    d = OffloadKV.defaults()
    too_many = [c for _, c in a.sketches if c > llm.args.head_dim]
    if too_many:
        raise ValueError(f"--sketches: {too_many[0]} channels, but head_dim is {llm.args.head_dim}")
    per_layer = [[0.0] * len(a.sketches) for _ in range(llm.args.n_layers)]
    tasks = [make_task(name, llm.tokenizer, a.ctx) for name in a.tasks]
    for task in tasks:  # every prompt checked before the first decode
        if len(task.ids) > llm.room(task.max_new_tokens):
            raise ValueError(f"--ctx {a.ctx}: the {task.name} prompt and its answer do not fit "
                             f"{llm.name}'s {llm.args.max_seq_len}-token context")
        if int(a.fraction * len(task.ids)) < d["sink"] + d["recent"] + a.chunk:
            raise ValueError(f"--fraction {a.fraction}: {int(a.fraction * len(task.ids))} tokens of the "
                             f"{len(task.ids)}-token {task.name} prompt leave no chunk of {a.chunk} past "
                             f"OffloadKV's sink {d['sink']} + recent {d['recent']}")
    for name, task in zip(a.tasks, tasks):
        cap = len(task.ids) + task.max_new_tokens
        recs = [Rec(llm.args, i, cap, llm.device, llm.dtype) for i in range(llm.args.n_layers)]
        first = llm.model.prefill(torch.tensor([task.ids], device=llm.device), recs)
        greedy(llm.model, recs, first, len(task.ids), task.max_new_tokens, llm.tokenizer.eos_ids)
        for i, rec in enumerate(recs):
            for j, m in enumerate(layer_masses(rec, a.sketches, d["sink"], d["recent"], a.fraction, a.chunk)):
                per_layer[i][j] += m / len(a.tasks)
        print(f"{name}: {len(recs[0].queries)} decode steps", file=sys.stderr)
    names = [k if k == "exact" else f"{k}:{c}" for k, c in a.sketches]
    print(f"Attention mass on the middle kept by a selection of {a.fraction:.0%} of the prompt "
          f"{f'in chunks of {a.chunk} tokens ' if a.chunk > 1 else ''}"
          f"({', '.join(a.tasks)}; {a.ctx} tokens; mean over steps and query heads):\n")
    print("| layer | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for i, row in enumerate(per_layer):
        print(f"| {i} | " + " | ".join(f"{m:.3f}" for m in row) + " |")
    mean = [sum(r[j] for r in per_layer) / len(per_layer) for j in range(len(names))]
    print("| **mean** | " + " | ".join(f"**{m:.3f}**" for m in mean) + " |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"command": "python tools/sketch_mass.py " + " ".join(sys.argv[1:]), "chunk": a.chunk,
                       "sketches": names,
                       "mean": mean, "per_layer": per_layer}, fh, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="sketch_mass.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=parse_tokens, default=4096, help="prompt tokens (default 4k)")
    p.add_argument("--fraction", type=fraction, default=0.2, help="OffloadKV's budget as a share of the prompt (0.2)")
    p.add_argument("--tasks", type=task_names, default=["niah-number", "niah-uuid", "niah-multiquery"],
                   help=f"suite prompts, comma-separated, of {', '.join(TASKS)} (default niah-number,niah-uuid,"
                        "niah-multiquery)")
    p.add_argument("--sketches", type=lambda t: [sketch_kind(x) for x in t.split(",")],
                   default=[sketch_kind(x) for x in "exact,float:8,float:16,8bit:16,4bit:16,4bit:32".split(",")],
                   help="sketches to compare (default exact,float:8,float:16,8bit:16,4bit:16,4bit:32)")
    p.add_argument("--chunk", type=positive, default=1, help="OffloadKV's chunk: tokens selected together (default 1)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return cli(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
