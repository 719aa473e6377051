"""Generate text with a per-layer KV cache policy.

With no prompt it runs the demo: a pass-key haystack of --ctx tokens, and says whether the model
retrieved the key. Tokens stream to stdout as they come; progress and the summary go to stderr.
With --prompts-file, the prompts of a JSONL file are generated together as one batch and the
results come out as JSONL, one line per prompt, in the file's order.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from engine.cli import (Parser, cap_gpu_memory, check_writable, cli, fmt_bytes, gpu_memory, parse_tokens,
                        read_prompts_file, resolve_device)
from engine.eval.haystack import make_haystack
from engine.kv import POLICIES, parse_policy
from engine.kv.quant import CLIP, ROTATE
from engine.planner import parse_kv_budget
from engine.sampling import SamplingParams


# Flags that set one policy parameter: flag -> (policies it applies to, parameter). Unset flags (None)
# leave the policy's own default, so defaults live only in the policy constructors.
POLICY_FLAGS = {"kv_bits": (("quant",), "bits"), "kv_group": (("quant",), "group"),
                "kv_residual": (("quant",), "residual"), "kv_rotate": (("quant",), "rotate"),
                "kv_sink": (("quant",), "sink"), "kv_clip": (("quant",), "clip"), "kv_heavy": (("quant",), "heavy"),
                "budget": (("evict", "offload"), "budget"),
                "evict_during_decode": (("evict",), "evict_during_decode"), "sink": (("offload",), "sink"),
                "recent": (("offload",), "recent"), "channels": (("offload",), "channels"),
                "chunk": (("offload",), "chunk"), "lookahead": (("offload",), "lookahead"),
                "host_store": (("offload",), "host")}


def _default(policy: str, key: str) -> str:
    return f"default {POLICIES[policy].defaults()[key]}"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF model directory, .gguf file, or random:<preset> (random:llama-3.1-8b, random:tiny, ...); "
                        "default: the shipped SmolLM2-135M-Instruct")
    p.add_argument("--prompt", help="prompt text (default: a pass-key haystack of --ctx tokens)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--prompts-file", metavar="JSONL",
                   help="a batch: one prompt per line, as a JSON string or {\"prompt\": ..., \"max_new_tokens\": N}; "
                        "decoded together, results written as JSONL (to --out, default stdout)")
    p.add_argument("--out", metavar="PATH", help="--prompts-file: write the results JSONL here instead of stdout")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--allow-special", action="store_true",
                   help="parse special-token text such as <|im_end|> in a raw prompt as control tokens (default: it "
                        "stays text; with --chat only the template writes control tokens)")
    p.add_argument("--ctx", type=parse_tokens, default=4096,
                   help="context length in tokens (4096, 4k, 128k): the haystack size, and the cap on a "
                        "given prompt, whose middle is cut if longer (default 4k)")
    p.add_argument("--depth", type=float, help="haystack demo: where the pass key sits, 0..1 (default 0.5)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling and the pass key (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--policy", default="full",
                   help="KV cache policy: full (uncompressed), quant (1/2/4-bit), offload (prompt K/V in host "
                        "memory, top tokens fetched per step), evict (keep a token budget per layer), hybrid (a "
                        "per-layer plan: --plan, or profile the prompt and plan for --kv-budget); parameters as "
                        "name:key=value,... (quant:bits=4, offload:budget=256,lookahead=layer) or with the flags "
                        "below (default full)")
    p.add_argument("--plan", metavar="FILE", help="hybrid: per-layer plan JSON written by profile_layers.py")
    p.add_argument("--plan-policies",
                   help="hybrid without --plan: the policies the planner may choose besides full, e.g. quant,evict,offload "
                        "(default auto: all three on CUDA, evict,offload on CPU, where QuantKV saves bytes but "
                        "costs decode time: unpacking codes is slower than reading floats)")
    p.add_argument("--kv-budget",
                   help="hybrid without --plan: device KV budget, bytes (512MiB, 2GiB) or a fraction of FullKV "
                        "(0.2, 20%%) (default 0.2)")
    p.add_argument("--profile-tokens", type=lambda t: t if t == "auto" else parse_tokens(t),
                   help="hybrid without --plan: profile at most this many prompt tokens (middle cut); auto = the whole "
                        "prompt when its full cache fits in half the free memory (default auto)")
    p.add_argument("--kv-bits", type=int, help=f"quant: bits per key/value element, 1, 2 or 4 ({_default('quant', 'bits')})")
    p.add_argument("--kv-group", type=int,
                   help="quant: quantization group, tokens per key group and elements per value group "
                        "(default 32 with 8-bit ranges, i.e. at 1 and 2 bits, 64 at 4 bits; or the largest divisor "
                        "of head_dim below it)")
    p.add_argument("--kv-residual", type=int, help="quant: recent tokens kept in full precision, a multiple of "
                   f"--kv-group ({_default('quant', 'residual')})")
    p.add_argument("--kv-rotate", choices=ROTATE,
                   help="quant: Hadamard rotation of values (v) or keys and values (kv) before quantizing; auto = kv "
                        f"for a power-of-two head_dim ({_default('quant', 'rotate')})")
    p.add_argument("--kv-sink", type=int, help="quant: first tokens kept in full precision (attention sinks) "
                   f"({_default('quant', 'sink')})")
    p.add_argument("--kv-clip", choices=CLIP,
                   help="quant: each group's range chosen by squared error instead of min/max, for values (v) or "
                        f"keys and values (kv); auto = kv at 1 bit, else v ({_default('quant', 'clip')})")
    p.add_argument("--kv-heavy", type=float,
                   help="quant: fraction of the prompt kept in full precision per KV head, the tokens its last "
                        f"queries attend to most, e.g. 0.02 ({_default('quant', 'heavy')})")
    p.add_argument("--budget", type=int,
                   help="offload: prompt tokens attended per step, sink + recent + retrieved; evict: prompt "
                        f"tokens kept per layer ({_default('evict', 'budget')})")
    p.add_argument("--evict-during-decode", action="store_const", const=True,
                   help="evict: also evict while decoding, so the cache never exceeds --budget tokens")
    p.add_argument("--sink", type=int, help=f"offload: first prompt tokens always kept ({_default('offload', 'sink')})")
    p.add_argument("--recent", type=int, help=f"offload: last prompt tokens always kept ({_default('offload', 'recent')})")
    p.add_argument("--channels", type=int, help="offload: key channels per KV head in the on-device sketch that "
                   f"ranks tokens ({_default('offload', 'channels')})")
    p.add_argument("--chunk", type=int, help="offload: rank and fetch the prompt in chunks of this many tokens "
                   f"({_default('offload', 'chunk')})")
    p.add_argument("--lookahead", choices=["none", "layer", "step"],
                   help="offload: pick each step's tokens with this step's query (none: exact), an approximate "
                        "query one layer early (layer), or the previous step's query (step); the last two let "
                        "the copy overlap compute (default none: it measured as fast on an H100, see README)")
    p.add_argument("--host-store", choices=["model", "8bit"],
                   help="offload: keep the offloaded tokens in host memory as the model's values or as 8-bit "
                        "codes (half the PCIe bytes and host memory of bfloat16, a small error; "
                        f"{_default('offload', 'host')})")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA (default: replay a CUDA graph)")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens per prefill chunk: queries, attention output and MLP activations exist "
                        "one chunk at a time (default 2048)")
    p.add_argument("--gpu-memory", type=gpu_memory, metavar="SIZE",
                   help="cap this process's GPU memory, e.g. 24GiB: shows on a large GPU what a smaller one holds")
    p.add_argument("--stats-json", metavar="PATH", help="write the run's figures as JSON to PATH")
    return p


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# Flags of a hybrid that plans for itself: flag -> default. Given with another policy or with --plan,
# they would change nothing, so they are refused rather than ignored.
PLANNING_FLAGS = {"kv_budget": "0.2", "plan_policies": "auto", "profile_tokens": "auto"}


def policy_arg(a: argparse.Namespace) -> str:
    """--policy and the per-parameter flags -> one 'name:key=value,...' policy for the API. Fills
    in the planning flags' defaults."""
    name = a.policy.partition(":")[0]
    if a.plan is not None and name != "hybrid":
        raise ValueError(f"--plan is for --policy hybrid, not {a.policy!r}")
    for flag, default in PLANNING_FLAGS.items():
        if getattr(a, flag) is not None and (name != "hybrid" or a.plan is not None):
            raise ValueError(f"--{flag.replace('_', '-')} is for --policy hybrid without --plan, "
                             f"not {'--plan' if a.plan is not None else f'--policy {name}'}")
        setattr(a, flag, default if getattr(a, flag) is None else getattr(a, flag))
    pieces = [a.policy]
    for flag, (names, key) in POLICY_FLAGS.items():
        value = getattr(a, flag)
        if value is None:
            continue
        if name not in names:
            raise ValueError(f"--{flag.replace('_', '-')} applies to {' and '.join(names)}, not --policy {name}")
        pieces.append(f"{key}={int(value) if isinstance(value, bool) else value}")
    if len(pieces) == 1:
        return a.policy
    return pieces[0] + ("," if ":" in pieces[0] else ":") + ",".join(pieces[1:])


def read_prompt(a: argparse.Namespace) -> str | None:
    if a.prompt is not None and a.prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    text = a.prompt
    if a.prompt_file is not None:
        try:
            with open(a.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompt file {a.prompt_file}: {getattr(e, 'strerror', None) or e}") from None
    if text is not None and not text.strip():
        raise ValueError("empty prompt")
    return text


def run_batch(llm, a: argparse.Namespace, prompts: list[str], news: list[int], policy, options: dict, log) -> int:
    """Generate for every prompt together; write one JSONL line per prompt, in order."""
    from tqdm import tqdm
    profiling = None
    if policy == "hybrid":  # each prompt is profiled (and planned) before the batch starts
        profiling = tqdm(total=llm.args.n_layers * len(prompts), desc="profile", unit="layer", file=sys.stderr,
                         leave=False, disable=None)
    stream = llm.stream(prompts, news, policy, a.kv_budget,
                        on_profile_layer=None if profiling is None else profiling.update, **options)
    if profiling is not None:
        profiling.close()
    bar = tqdm(total=sum(news), desc=f"batch of {len(prompts)}", unit="tok", file=sys.stderr, leave=False, disable=None)
    t = time.perf_counter()
    for _ in stream:  # pieces are per prompt; the JSONL is written once all have finished
        bar.update()
    wall = time.perf_counter() - t
    bar.close()
    outs = stream.outputs
    lines = [json.dumps({"index": i, "text": o.text, "token_ids": o.token_ids, "prompt_tokens": o.prompt_tokens,
                         "stop_reason": o.stop_reason, "kv_bytes": o.kv_bytes}) for i, o in enumerate(outs)]
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    else:
        print("\n".join(lines), flush=True)
    new = sum(len(o.token_ids) for o in outs)
    decode_s = max(wall - sum(o.prefill_s for o in outs), 1e-9)
    kv = {tier: sum(o.kv_bytes[tier] for o in outs) for tier in ("device", "host")}
    log(f"{len(outs)} prompts, {sum(o.prompt_tokens for o in outs)} prompt tokens | prefill "
        f"{sum(o.prefill_s for o in outs):.2f} s | {new} new tokens, decode {new / decode_s:.1f} tokens/s | KV device "
        f"{fmt_bytes(kv['device'])}, host {fmt_bytes(kv['host'])} (FullKV {fmt_bytes(sum(o.full_kv_bytes for o in outs))})")
    if a.stats_json:
        with open(a.stats_json, "w") as f:
            json.dump({"model": llm.name, "device": str(llm.device), "policy": a.policy, "prompts": len(outs),
                       "new_tokens": new, "wall_s": wall, "decode_tokens_per_s": new / decode_s, "kv_bytes": kv,
                       "outputs": [json.loads(line) for line in lines]}, f, indent=1)
    return 0


def run(a: argparse.Namespace) -> int:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    # Everything the flags can get wrong is checked before the model loads.
    if a.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    SamplingParams(a.temperature, a.top_k, a.top_p, a.seed)
    text = read_prompt(a)
    batch = None
    if a.prompts_file is not None:
        if text is not None:
            raise ValueError("give --prompts-file or --prompt/--prompt-file, not both")
        batch = read_prompts_file(a.prompts_file, a.max_new_tokens)
    elif a.out is not None:
        raise ValueError("--out is for --prompts-file (a single prompt streams to stdout)")
    if a.depth is not None and (text is not None or batch is not None):
        raise ValueError("--depth places the demo's pass key: give it without --prompt, --prompt-file or --prompts-file")
    a.depth = 0.5 if a.depth is None else a.depth
    if not 0 <= a.depth <= 1:
        raise ValueError(f"--depth must be in [0, 1], got {a.depth}")
    policy = policy_arg(a)
    if policy != "hybrid" and not policy.startswith("hybrid"):
        parse_policy(policy)  # names, keys and value types; their values against the model's shapes below
    elif ":" in policy:
        raise ValueError("--policy hybrid takes no parameters (see --kv-budget, --plan, --plan-policies)")
    elif a.plan is None:
        parse_kv_budget(a.kv_budget, 1)  # the syntax; the bytes follow from the model and the prompt
    if a.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk must be >= 1, got {a.prefill_chunk}")
    check_writable(a.stats_json, "--stats-json")
    check_writable(a.out, "--out")
    device, _ = resolve_device(a.device, a.dtype)
    cap_gpu_memory(a.gpu_memory, device)
    from engine import LLM, Plan  # heavy imports after the argument checks: errors come fast
    from engine.plan import policy_specs
    from weights.load import model_config
    plan = Plan.load(a.plan) if policy == "hybrid" and a.plan else None  # its layers checked here
    if plan is not None or policy != "hybrid":  # every value, against the model's config: before the weights load
        name, args = model_config(a.model, log)
        if plan is not None:
            plan.check(name, args.n_layers, a.plan)
        policy_specs(plan or policy, name, args)

    llm = LLM(a.model, a.device, a.dtype, log=log)
    if plan is not None:
        log(f"plan {a.plan}: made for {plan.header.get('context')} tokens, {plan.header.get('mode', 'hybrid')} mode")
        policy = plan
    options = dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed, chat=a.chat,
                   allow_special=a.allow_special, ctx=a.ctx, cuda_graphs=not a.no_cuda_graphs,
                   prefill_chunk=a.prefill_chunk, kinds=a.plan_policies, profile_tokens=a.profile_tokens)
    if batch is not None:
        return run_batch(llm, a, *batch, policy, options, log)
    haystack = None
    if text is None:
        room = llm.room(a.max_new_tokens, a.ctx)
        if room < a.ctx:
            log(f"warning: --ctx {a.ctx} + {a.max_new_tokens} new tokens exceeds {llm.name}'s context of "
                f"{llm.args.max_seq_len}; using a {room}-token haystack")
        haystack = make_haystack(llm.tokenizer, room, depth=a.depth, seed=a.seed)
        log(f"pass-key demo: {len(haystack.ids)}-token haystack, key {haystack.key} at depth {haystack.depth:.2f}")

    from tqdm import tqdm
    hybrid = policy == "hybrid"  # the prompt is profiled (a prefill of its own) before the real prefill
    bar = tqdm(total=llm.args.n_layers, desc="profile" if hybrid else "prefill", unit="layer", file=sys.stderr,
               leave=False, disable=None)
    stream = llm.stream(haystack.ids if haystack else text, a.max_new_tokens, policy, a.kv_budget,
                        on_layer=bar.update, on_profile_layer=bar.update, **options)
    if hybrid:  # profiled and planned: the same bar counts the prefill's layers now
        bar.reset()
        bar.set_description("prefill")
    for piece in stream:
        print(piece, end="", flush=True)
    bar.close()
    print(flush=True)
    out = stream.output
    kv, full = out.kv_bytes, out.full_kv_bytes
    peak = peak_memory_bytes(llm.device)
    reserved = torch.cuda.max_memory_reserved(llm.device) if llm.device.type == "cuda" else None
    log(f"prompt {out.prompt_tokens} tokens | prefill {out.prefill_s:.2f} s "
        f"({out.prompt_tokens / max(out.prefill_s, 1e-9):.0f} tok/s) | decode {out.decode_ms_per_token:.1f} ms/token "
        f"({len(out.token_ids)} tokens, {out.stop_reason}{', CUDA graph' if out.cuda_graphs else ''}) | "
        f"KV device {fmt_bytes(kv['device'])}, host {fmt_bytes(kv['host'])} (FullKV {fmt_bytes(full)})"
        + (f" | peak GPU {fmt_bytes(peak)} allocated, {fmt_bytes(reserved)} reserved (the whole run, profiling "
           f"included)" if reserved is not None else ""))
    if haystack is not None:
        log(f"pass key {haystack.key}: {'retrieved' if haystack.found(out.text) else 'NOT retrieved'}")
    if a.stats_json:
        stats = {
            "model": llm.name, "device": str(llm.device), "dtype": str(llm.dtype).removeprefix("torch."),
            "policy": a.policy, "ctx": a.ctx, "prompt_tokens": out.prompt_tokens,
            "generated_ids": out.token_ids, "text": out.text, "stop_reason": out.stop_reason,
            "prefill_s": out.prefill_s, "decode_ms_per_token": out.decode_ms_per_token,
            "decode_steps": out.decode_steps, "cuda_graphs": out.cuda_graphs,
            "kv_bytes": kv, "full_kv_bytes": full, "peak_memory_bytes": peak, "peak_reserved_bytes": reserved,
            "layers": out.layers,
            "passkey": None if haystack is None else {
                "key": haystack.key, "depth": haystack.depth, "retrieved": haystack.found(out.text)},
        }
        with open(a.stats_json, "w") as f:
            json.dump(stats, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
