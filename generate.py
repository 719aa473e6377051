"""Generate text with a per-layer KV cache policy.

With no prompt it runs the demo: a pass-key haystack of --ctx tokens, and says whether the model
retrieved the key. Tokens stream to stdout as they come; progress and the summary go to stderr.
With --prompts-file, the prompts of a JSONL file are generated together as one batch and the
results come out as JSONL, one line per prompt, in the file's order.
"""
from __future__ import annotations

import signal

if __name__ == "__main__":  # Ctrl-C while torch imports (~2 s) ends the program quietly, not in a
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # traceback; cli() takes it over ("interrupted", exit 130)

import argparse
import json
import resource
import sys
import time

import torch

from engine.cli import (Parser, cap_gpu_memory, check_distinct, check_writable, cli, fmt_bytes, gpu_memory,
                        parse_tokens, read_prompts_file, resolve_device)
from engine.eval.haystack import make_haystack
from engine.cli_policy import add_policy_flags, policy_arg
from engine.kv import parse_policy
from engine.planner import parse_kv_budget
from engine.sampling import SamplingParams


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
    add_policy_flags(p)  # --policy, a hybrid's planning flags, one flag per policy parameter
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
    # the bar below counts tokens as they are generated (text pieces can lag a token behind)
    stream = llm.stream(prompts, news, policy, a.kv_budget, on_token=lambda _: bar.update(),
                        on_profile_layer=None if profiling is None else profiling.update, **options)
    if profiling is not None:
        profiling.close()
    bar = tqdm(total=sum(news), desc=f"batch of {len(prompts)}", unit="tok", file=sys.stderr, leave=False, disable=None)
    t = time.perf_counter()
    for _ in stream:  # pieces are per prompt; the JSONL is written once all have finished
        pass
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


def check_hybrid_budget(a: argparse.Namespace, name: str, args, device, dtype, text, batch):
    """A hybrid's KV budget against the context it plans for, before the weights load: each prompt
    (text counted by the model's tokenizer, read without the weights; the demo's haystack is token
    ids already). -> the prompt (a batch: each prompt) as token ids."""
    from engine.planner import check_kv_budget, plan_kinds
    from engine.runner import encode_prompt, prompt_room
    from weights.load import model_tokenizer
    kinds = plan_kinds(a.plan_policies, device)
    tokenizer = model_tokenizer(a.model)
    prompts, news = batch if batch is not None else ([text], [a.max_new_tokens])
    out = []
    for i, (prompt, new) in enumerate(zip(prompts, news)):
        try:
            ids = encode_prompt(tokenizer, args.vocab_size, prompt, a.chat, a.allow_special)
            context = min(len(ids), prompt_room(args, name, new, a.ctx))  # a longer prompt loses its middle
            check_kv_budget(args, a.kv_budget, context, new, dtype.itemsize, "hybrid", kinds)
        except ValueError as e:  # a batch's error names its prompt, as the API's does
            raise ValueError(f"prompt {i}: {e}" if batch is not None else str(e)) from None
        out.append(ids)
    return out if batch is not None else out[0]


def run(a: argparse.Namespace) -> int:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    # Everything the flags can get wrong is checked before the model loads.
    if a.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    SamplingParams(a.temperature, a.top_k, a.top_p, a.seed)
    if a.temperature == 0 and (a.top_k != 0 or a.top_p != 1.0):  # greedy decoding ignores both
        raise ValueError(f"--{'top-k' if a.top_k != 0 else 'top-p'} applies when sampling: give --temperature > 0")
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
    for flag in ("chat", "allow_special"):  # the demo's haystack is token ids: neither would apply
        if getattr(a, flag) and text is None and batch is None:
            raise ValueError(f"--{flag.replace('_', '-')} is for a prompt of your own (--prompt, --prompt-file, "
                             "--prompts-file), not the pass-key demo")
    if a.chat and a.allow_special:
        raise ValueError("--allow-special is for a raw prompt: with --chat only the template writes control tokens")
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
    check_distinct({"--out": a.out, "--stats-json": a.stats_json},
                   [(flag, path) for flag, path in (("--prompt-file", a.prompt_file), ("--prompts-file", a.prompts_file),
                                                    ("--plan", a.plan)) if path])
    device, dtype = resolve_device(a.device, a.dtype)
    cap_gpu_memory(a.gpu_memory, device)
    from engine import LLM, Plan  # heavy imports after the argument checks: errors come fast
    from engine.plan import policy_specs
    from weights.load import model_config
    plan = Plan.load(a.plan) if policy == "hybrid" and a.plan else None  # its layers checked here
    # Every value against the model's config, before the weights load
    name, args = model_config(a.model)
    haystack = None
    if text is None and batch is None:  # the demo's haystack: a --ctx too short for one fails here
        from engine.runner import prompt_room
        from weights.load import model_tokenizer
        room = prompt_room(args, name, a.max_new_tokens, a.ctx)
        if room < a.ctx:
            log(f"warning: --ctx {a.ctx} + {a.max_new_tokens} new tokens exceeds {name}'s context of "
                f"{args.max_seq_len}; using a {room}-token haystack")
        haystack = make_haystack(model_tokenizer(a.model), room, depth=a.depth, seed=a.seed)
    if plan is not None or policy != "hybrid":
        policy_specs(plan or policy, name, args)  # a plan made for another model: an error naming the file
    else:  # the prompts come back as token ids, tokenized once: the stream takes them as they are
        ids = check_hybrid_budget(a, name, args, device, dtype, haystack.ids if haystack else text, batch)
        if batch is not None:
            batch = (ids, batch[1])
        elif haystack is None:
            text = ids

    llm = LLM(a.model, a.device, a.dtype, log=log)
    if plan is not None:
        log(f"plan {a.plan}: made for {plan.header.get('context')} tokens, {plan.header.get('mode', 'hybrid')} mode")
        policy = plan
    options = dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed, chat=a.chat,
                   allow_special=a.allow_special, ctx=a.ctx, cuda_graphs=not a.no_cuda_graphs,
                   prefill_chunk=a.prefill_chunk, kinds=a.plan_policies, profile_tokens=a.profile_tokens)
    if batch is not None:
        return run_batch(llm, a, *batch, policy, options, log)
    if haystack is not None:
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
        f"({out.prompt_tokens / max(out.prefill_s, 1e-9):.0f} tok/s) | decode "
        + (f"{out.decode_ms_per_token:.1f} ms/token" if out.decode_steps
           else "none (the prefill chose every token)" if out.token_ids else "none (no new tokens asked for)")
        + f" ({len(out.token_ids)} tokens, {out.stop_reason}{', CUDA graph' if out.cuda_graphs else ''}) | "
        f"KV device {fmt_bytes(kv['device'])}, host {fmt_bytes(kv['host'])} (FullKV {fmt_bytes(full)})"
        + (f" | peak GPU {fmt_bytes(peak)} allocated, {fmt_bytes(reserved)} reserved (the whole run, profiling "
           f"included)" if reserved is not None else ""))
    # the pass key's verdict; None when nothing was generated (nothing to check)
    retrieved = None if haystack is None or not out.token_ids else haystack.found(out.text)
    if haystack is not None:
        log(f"pass key {haystack.key}: " + {None: "not checked (no tokens generated)", True: "retrieved",
                                            False: "NOT retrieved"}[retrieved])
    if a.stats_json:
        stats = {
            "model": llm.name, "device": str(llm.device), "dtype": str(llm.dtype).removeprefix("torch."),
            "policy": a.policy, "ctx": a.ctx, "prompt_tokens": out.prompt_tokens,
            "generated_ids": out.token_ids, "text": out.text, "stop_reason": out.stop_reason,
            "prefill_s": out.prefill_s, "decode_ms_per_token": out.decode_ms_per_token if out.decode_steps else None,
            "decode_steps": out.decode_steps, "cuda_graphs": out.cuda_graphs,
            "kv_bytes": kv, "full_kv_bytes": full, "peak_memory_bytes": peak, "peak_reserved_bytes": reserved,
            "layers": out.layers,
            "passkey": None if haystack is None else {
                "key": haystack.key, "depth": haystack.depth, "retrieved": retrieved},
        }
        with open(a.stats_json, "w") as f:
            json.dump(stats, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
