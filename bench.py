"""Benchmark KV policies side by side: a matrix of policies x context lengths on one model, with
latency (prefill s, median decode ms/token), memory (KV bytes by tier, vs FullKV, peak) and quality
against FullKV on the same prompts (pass key over depths, teacher-forced KL / top-1 / perplexity),
plus the peers on the same weights where installed: transformers (DynamicCache, 4-bit
QuantizedCache) and kvpress presses at the same kept fraction (`make peers` builds their venv).

    python bench.py                                  # SmolLM2-135M on CPU, 2k/4k/8k, every policy
    python bench.py --quick --json out.json          # a few minutes on 2 CPU cores
    .venv-peers/bin/python bench.py --ctx 2k,4k --plots figs --markdown bench.md
    python bench.py --model random:llama-3.1-8b --device cuda --dtype bfloat16 --ctx 32k,64k,128k \\
        --policies full,quant,offload,evict --peers transformers
    .venv-peers/bin/python bench.py --suite --ctx 4k --plots figs   # RULER-style tasks vs kept fraction
    python bench.py --throughput --ctx 2k --kv-memory 1GiB --plots figs # tokens/s vs batch at a memory cap

--suite measures quality only: RULER-style tasks (needles of numbers, words and UUIDs, multi-key
with distractors, multi-value, multi-query, variable tracking, common-words extraction), greedy
answers scored by task accuracy and by agreement with FullKV's answer, at every --kv-fraction
(default for the suite 0.05,0.1,0.2,0.35,0.5), for our policies and the peers. On a float32 model,
add full:store=bfloat16 to --policies for the noise floor: how often FullKV's own answer changes when
its cache is merely rounded to bfloat16.

--throughput measures decode tokens/s at batch 1, 2, 4, ... up to the largest batch of --ctx-token
prompts whose KV caches fit --kv-memory, per policy (ours; at the first --kv-fraction).

Progress goes to stderr; the markdown table to stdout.
"""
from __future__ import annotations

import signal

if __name__ == "__main__":  # Ctrl-C while torch imports (~2 s) ends the program quietly, not in a
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # traceback; cli() takes it over ("interrupted", exit 130)

import argparse
import datetime
import importlib.metadata
import json
import shlex
import sys

from engine.cli import (Parser, cap_gpu_memory, check_dir_writable, check_writable, cli, gpu_memory, parse_policies,
                        parse_tokens, resolve_device)
from engine.kv import parse_policy
from engine.plan import Plan


def parse_list(kind):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty list: {text!r}")
        return [kind(t) for t in items]
    return parse


def unit_number(what: str, examples: str, label: str, zero_ok: bool):
    """An argparse type: a float in [0, 1] (zero_ok) or (0, 1]."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {what}: {text!r} (examples: {examples})") from None
        if not (0.0 <= x if zero_ok else 0.0 < x) or x > 1.0:
            raise argparse.ArgumentTypeError(f"{label} must be in {'[' if zero_ok else '('}0, 1], got {text!r}")
        return x
    return parse


fraction = unit_number("fraction", "0.1, 0.2", "a kept fraction", zero_ok=False)
depth = unit_number("depth", "0.1, 0.5", "a pass-key depth", zero_ok=True)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as generate.py: HF dir, .gguf, random:<preset>; default the shipped "
                                                 "SmolLM2-135M-Instruct")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--ctx", type=parse_list(parse_tokens), default=None,
                   help="context lengths, comma-separated (default 2k,4k,8k; --quick: 1k); a prompt is cut to fit "
                        "the model's own context with the generated tokens after it")
    p.add_argument("--policies", type=parse_policies, default=None,
                   help="our policies: full, quant (4-bit), evict, offload, hybrid, or name:key=value / plan:PATH "
                        "(default all five)")
    p.add_argument("--kv-fraction", type=parse_list(fraction), default=None,
                   help="kept-KV fraction(s), e.g. 0.2 or 0.1,0.2,0.4: the first sets the latency matrix; quality is "
                        "measured at each (accuracy-vs-fraction plot) (default 0.2; with --suite 0.05,0.1,0.2,0.35,0.5)")
    p.add_argument("--peers", type=parse_list(str),
                   help="transformers, kvpress, all, none, or single ones: hf-dynamic, hf-quanto4, hf-quanto2, "
                        "kvpress-snapkv, kvpress-pyramidkv, kvpress-adakv, kvpress-streamingllm, kvpress-tova, "
                        "kvpress-knorm (default all; missing ones are "
                        "reported as skipped)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per cell, >= 16 (default 16; --quick 16)")
    p.add_argument("--warmup", type=int, default=2, help="decode steps before timing (default 2)")
    p.add_argument("--depths", type=parse_list(depth), default=None,
                   help="pass-key depths (default 0.25,0.5,0.75; --quick 0.5)")
    p.add_argument("--seeds", type=int, help="pass keys per depth (default 1)")
    p.add_argument("--continuation", type=int, default=None,
                   help="teacher-forced tokens for KL / top-1 / ppl (default 64; --quick 16)")
    p.add_argument("--no-quality", action="store_true", help="latency and memory only")
    p.add_argument("--suite", action="store_true",
                   help="run the RULER-style task suite instead of the latency/quality matrix (see above)")
    p.add_argument("--tasks", type=parse_list(str), default=None,
                   help="suite tasks, comma-separated (default all: niah-number, niah-word, niah-uuid, niah-multikey, "
                        "niah-multivalue, niah-multiquery, vt, cwe; --quick: niah-number,vt)")
    p.add_argument("--throughput", action="store_true",
                   help="measure decode tokens/s vs batch size at a KV memory cap instead of the matrix (see above)")
    p.add_argument("--kv-memory", metavar="SIZE",
                   help="--throughput: the KV memory cap, e.g. 1GiB (device bytes; on a CPU host bytes too) "
                        "(default: 90%% of the device memory free once the model is loaded)")
    p.add_argument("--max-batch", type=int, default=64, help="--throughput: the largest batch tried (default 64)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the unreported warm-up pass over every policy and peer (JIT compiles, cuBLAS "
                        "heuristics); the first cell then pays for them")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1k context, one pass key, 16 continuation tokens")
    p.add_argument("--gpu-memory", type=gpu_memory, metavar="SIZE",
                   help="cap this process's GPU memory (ours and the peers' alike), e.g. 24GiB for a 24 GB card")
    p.add_argument("--json", metavar="PATH", help="write every number as JSON (rewritten after each cell)")
    p.add_argument("--markdown", metavar="PATH", help="write the table with the command, date and device (for the README)")
    p.add_argument("--plots", metavar="DIR", help="write latency.png, memory.png (and accuracy.png for several fractions)")
    p.add_argument("--render", metavar="JSON", help="measure nothing: print the table (and write --markdown/--plots) "
                                                    "from a --json file of an earlier run, e.g. one from a GPU machine")
    return p


def meta(a: argparse.Namespace, m, device, dtype, cfg) -> dict:
    import torch

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"command": "python bench.py " + shlex.join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "model": m.name, "device": str(device), "device_name": name,
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "transformers": version("transformers"), "kvpress": version("kvpress"),
            "optimum_quanto": version("optimum-quanto"), "fractions": cfg.fractions, "steps": cfg.steps,
            "warmup": cfg.warmup, "ctxs": cfg.ctxs, "policies": cfg.policies, "depths": cfg.depths,
            "seeds": cfg.seeds, "continuation": cfg.continuation, "quality": cfg.quality,
            "suite": a.suite, "tasks": a.tasks}


def write_outputs(a: argparse.Namespace, results: dict, log) -> None:
    from engine.eval.report import markdown, plots
    text = markdown(results)
    print(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)
    if a.plots:
        log("plots: " + ", ".join(plots(results, a.plots)))


def run(a: argparse.Namespace) -> int:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    if a.render:
        defaults = vars(build_parser().parse_args([]))
        ignored = [k for k, v in vars(a).items() if k not in ("render", "markdown", "plots") and v != defaults[k]]
        if ignored:
            raise ValueError(f"--render measures nothing: --{ignored[0].replace('_', '-')} would change nothing "
                             "(only --markdown and --plots go with it)")
        check_writable(a.markdown, "--markdown")
        check_dir_writable(a.plots, "--plots")
        try:
            with open(a.render) as f:
                results = json.load(f)
            if "command" not in results["meta"] or "cells" not in results:
                raise KeyError("meta.command")
            from engine.eval.report import markdown
            markdown(results)  # every field the table needs is there and of the right kind
        except OSError as e:
            raise ValueError(f"--render {a.render}: {e.strerror or e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, IndexError,
                ValueError) as e:
            raise ValueError(f"{a.render}: not a bench.py --json file ({type(e).__name__}: {e})") from None
        write_outputs(a, results, log)
        return 0
    if a.steps < 16:
        raise ValueError(f"--steps must be >= 16 (the median needs enough steps), got {a.steps}")
    if a.suite and a.throughput:
        raise ValueError("give --suite or --throughput, not both")
    if a.suite and a.no_quality:
        raise ValueError("--suite measures answers, which --no-quality turns off")
    # Flags the chosen run would ignore are refused. Without quality (--no-quality, --throughput, or
    # random: weights, which have no answers to score) the matrix's quality flags do nothing and only
    # the first --kv-fraction counts; the suite makes its own prompts; throughput runs ours only.
    quality = ("--depths", "--seeds", "--continuation")
    runs = [(a.throughput, "a --throughput run", quality + ("--peers",)),  # (applies, the run, flags it ignores)
            (a.suite, "a --suite run", ("--depths", "--continuation")),
            (a.no_quality, "a --no-quality run", quality),
            ((a.model or "").startswith("random:"), "a run on random: weights (no answers: quality is skipped)",
             quality)]
    run, ignored = next(((name, flags) for applies, name, flags in runs if applies), (None, ()))
    for flag in ignored:
        if getattr(a, flag[2:]) is not None:  # --depths -> a.depths
            raise ValueError(f"{flag} does nothing in {run}")
    if run is not None and not a.suite and len(a.kv_fraction or []) > 1:  # a run without quality
        raise ValueError(f"--kv-fraction: {run} uses only the first fraction; give one")
    a.seeds = 1 if a.seeds is None else a.seeds
    a.peers = ["all"] if a.peers is None else a.peers
    if a.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {a.warmup}")
    if a.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {a.seeds}")
    if a.continuation is not None and a.continuation < 2:
        raise ValueError(f"--continuation must be >= 2, got {a.continuation}")
    from engine.eval.cells import OUR_POLICIES, BenchConfig
    from engine.eval.peers import expand_peers
    peers = expand_peers(a.peers)
    if a.suite:
        from engine.eval.tasks import TASKS
        a.tasks = a.tasks or (["niah-number", "vt"] if a.quick else list(TASKS))
        bad = [t for t in a.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task {bad[0]!r}; choose from {', '.join(TASKS)}")
        if a.model and a.model.startswith("random:"):
            raise ValueError("--suite measures answers: random: weights have none; use a real model")
    elif a.tasks:
        raise ValueError("--tasks goes with --suite")
    if (a.kv_memory is not None or a.max_batch != 64) and not a.throughput:
        raise ValueError("--kv-memory and --max-batch go with --throughput")
    if a.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {a.max_batch}")
    kv_cap = None
    if a.kv_memory is not None:
        from engine.planner import parse_bytes
        kv_cap = parse_bytes(a.kv_memory)
        if kv_cap is None:
            raise ValueError(f"--kv-memory needs a unit: {a.kv_memory!r} (examples: 512MiB, 2GiB)")
    policies = a.policies or list(OUR_POLICIES)
    for name in policies:  # every piece's form first (cheap), its values against the model's config below
        if name.startswith("plan:"):
            Plan.load(name[len("plan:"):])
        elif ":" in name:
            parse_policy(name)
        elif name not in OUR_POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(OUR_POLICIES)}, name:key=value or plan:PATH")
    for path, flag in ((a.json, "--json"), (a.markdown, "--markdown")):
        check_writable(path, flag)
    check_dir_writable(a.plots, "--plots")
    fractions = a.kv_fraction  # None: the default; the suite's draws curves
    if fractions is None:
        fractions = [0.05, 0.1, 0.2, 0.35, 0.5] if a.suite and not a.quick else [0.2]
    cfg = BenchConfig(ctxs=a.ctx or ([1024] if a.quick else [2048, 4096, 8192]), policies=policies,
                      fractions=fractions, steps=a.steps, warmup=a.warmup,
                      depths=a.depths or ([0.5] if a.quick else [0.25, 0.5, 0.75]), seeds=a.seeds,
                      continuation=a.continuation or (16 if a.quick else 64), quality=not a.no_quality,
                      warm_up=not a.no_warmup)
    device, _ = resolve_device(a.device, a.dtype)
    gpu_cap = cap_gpu_memory(a.gpu_memory, device)

    from engine import LLM
    from engine.eval.matrix import run_matrix
    from engine.plan import policy_specs
    from weights.load import model_config
    config = model_config(a.model)  # (name, shapes): read without the 16 GB of an 8B model's weights
    for name in policies:
        if ":" in name:
            policy_specs(name, *config)  # plan for this model? parameter values in range?
    m = LLM(a.model, a.device, a.dtype, log=log)
    device, dtype = m.device, m.dtype
    results = {"meta": {**meta(a, m, device, dtype, cfg), "gpu_memory_cap": gpu_cap},
               "cells": [], "sweep": [], "suite": [], "throughput": []}

    def save() -> None:  # after every cell: a long run that dies still leaves its numbers
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)

    if a.suite:
        from engine.eval.suite import run_suite_all
        run_suite_all(m, cfg, a.tasks, peers, results, save, log)
    elif a.throughput:
        from engine.cli import free_memory
        from engine.eval.throughput import run_throughput
        run_throughput(m, cfg, kv_cap or int(0.9 * free_memory(device)), a.max_batch, results, save, log)
    else:
        run_matrix(m, cfg, peers, results, save, log)
    save()
    write_outputs(a, results, log)
    bad = [c for c in results["cells"] if c["status"] == "error"]
    if bad:
        log(f"{len(bad)} cell(s) failed; their rows say why")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
