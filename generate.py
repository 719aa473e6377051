"""Generate text with a per-layer KV cache policy.

With no prompt it runs the demo: a pass-key haystack of --ctx tokens, and says whether the model
retrieved the key. Tokens stream to stdout as they come; progress and the summary go to stderr.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from engine.haystack import make_haystack
from engine.kv import POLICIES
from engine.runner import fit_prompt, generate
from engine.sampling import SamplingParams


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: the error is what the user needs to see
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_tokens(text: str) -> int:
    """'4096', '4k' (4096), '128k' (131072), '1m' -> a token count."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if mult > 1 else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (examples: 4096, 4k, 128k)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return n * mult


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF model directory, .gguf file, or random:<preset> (random:llama-3.1-8b, random:tiny, ...); "
                        "default: the shipped SmolLM2-135M-Instruct")
    p.add_argument("--prompt", help="prompt text (default: a pass-key haystack of --ctx tokens)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--ctx", type=parse_tokens, default=4096,
                   help="context length in tokens (4096, 4k, 128k): the haystack size, and the cap on a "
                        "given prompt, whose middle is cut if longer (default 4k)")
    p.add_argument("--depth", type=float, default=0.5, help="haystack demo: where the pass key sits, 0..1 (default 0.5)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling and the pass key (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--policy", default="full", choices=sorted(POLICIES) + ["hybrid"],
                   help="KV cache policy: full (uncompressed), quant (1/2/4-bit, --kv-*), offload (prompt K/V in "
                        "host memory, top tokens fetched per step; --budget, ...), evict (keep --budget tokens "
                        "per layer), hybrid (a per-layer plan: --plan, or profile the prompt and plan for --kv-budget)")
    p.add_argument("--plan", metavar="FILE", help="hybrid: per-layer plan JSON written by profile_layers.py")
    p.add_argument("--plan-policies", default="auto",
                   help="hybrid without --plan: the policies the planner may choose besides full, e.g. quant,evict,offload "
                        "(default auto: all three on CUDA, evict,offload on CPU, where QuantKV saves bytes but "
                        "costs decode time: unpacking codes is slower than reading floats)")
    p.add_argument("--kv-budget", default="0.2",
                   help="hybrid without --plan: device KV budget, bytes (512MiB, 2GiB) or a fraction of FullKV "
                        "(0.2, 20%%) (default 0.2)")
    p.add_argument("--profile-tokens", type=parse_tokens, default=4096,
                   help="hybrid without --plan: profile at most this many prompt tokens (middle cut; default 4k)")
    p.add_argument("--kv-bits", type=int, default=2, help="quant: bits per key/value element, 1, 2 or 4 (default 2)")
    p.add_argument("--kv-group", type=int, default=64,
                   help="quant: quantization group, tokens per key group and elements per value group (default 64)")
    p.add_argument("--kv-residual", type=int, default=128,
                   help="quant: recent tokens kept in full precision, a multiple of --kv-group (default 128)")
    p.add_argument("--budget", type=int, default=512,
                   help="offload: prompt tokens attended per step, sink + recent + retrieved; evict: prompt "
                        "tokens kept per layer (default 512)")
    p.add_argument("--evict-during-decode", action="store_true",
                   help="evict: also evict while decoding, so the cache never exceeds --budget tokens")
    p.add_argument("--sink", type=int, default=16, help="offload: first prompt tokens always kept (default 16)")
    p.add_argument("--recent", type=int, default=64, help="offload: last prompt tokens always kept (default 64)")
    p.add_argument("--channels", type=int, default=8,
                   help="offload: key channels per KV head in the on-device sketch that ranks tokens (default 8)")
    p.add_argument("--lookahead", default="none", choices=["none", "layer", "step"],
                   help="offload: pick each step's tokens with this step's query (none: exact), an approximate "
                        "query one layer early (layer), or the previous step's query (step); the last two let "
                        "the copy overlap compute (default none: it measured as fast on an H100, see README)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="decode eagerly on CUDA even when every layer's policy could replay a CUDA graph")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="tokens per chunk for prefill projections/MLP (bounds activation memory)")
    p.add_argument("--stats-json", metavar="PATH", help="write the run's figures as JSON to PATH")
    return p


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def resolve_device(name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    return device, getattr(torch, dtype_name)


def policy_spec(a: argparse.Namespace) -> dict:
    """The per-layer policy parameters the flags ask for (the same for every layer)."""
    if a.policy == "quant":
        return {"policy": "quant", "bits": a.kv_bits, "group": a.kv_group, "residual": a.kv_residual}
    if a.policy == "offload":
        return {"policy": "offload", "budget": a.budget, "sink": a.sink, "recent": a.recent, "channels": a.channels,
                "lookahead": a.lookahead}
    if a.policy == "evict":
        return {"policy": "evict", "budget": a.budget, "evict_during_decode": a.evict_during_decode}
    return {"policy": a.policy}


def plan_kinds(text: str, device: torch.device) -> tuple[str, ...]:
    """--plan-policies: 'auto' leaves QuantKV out on CPU (see the flag's help)."""
    if text == "auto":
        return ("quant", "evict", "offload") if device.type == "cuda" else ("evict", "offload")
    return tuple(filter(None, text.split(",")))


def hybrid_specs(a: argparse.Namespace, m, ids: list[int], elem: int, log) -> list[dict]:
    """Per-layer specs for --policy hybrid: from --plan, or by profiling this prompt and planning."""
    from engine.planner import load_plan, make_plan, parse_kv_budget
    if a.plan:
        header, specs = load_plan(a.plan, m.name, m.args.n_layers)
        log(f"plan {a.plan}: made for {header.get('context')} tokens, {header.get('mode', 'hybrid')} mode")
        return specs
    from engine.profile import profile_prompt
    budget = parse_kv_budget(a.kv_budget, m.args.kv_bytes_per_token(elem) * (len(ids) + a.max_new_tokens))
    sample, _ = fit_prompt(ids, a.profile_tokens)
    t = time.perf_counter()
    stats = profile_prompt(m.model, sample)
    plan = make_plan(m.args, stats, len(ids), a.max_new_tokens, elem, budget,
                     kinds=plan_kinds(a.plan_policies, m.model.head.device))
    kinds = {}
    for o in plan:
        kinds[o.spec["policy"]] = kinds.get(o.spec["policy"], 0) + 1
    log(f"no --plan: profiled {len(sample)} prompt tokens in {time.perf_counter() - t:.1f} s; plan for "
        f"{fmt_bytes(budget)}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + " layers")
    return [o.spec for o in plan]


def run(a: argparse.Namespace) -> int:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if a.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    if a.prompt is not None and a.prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    sampling = SamplingParams(a.temperature, a.top_k, a.top_p, a.seed)
    text = a.prompt
    if a.prompt_file is not None:
        try:
            with open(a.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompt file {a.prompt_file}: {getattr(e, 'strerror', None) or e}") from None
    if text is not None and not text.strip():
        raise ValueError("empty prompt")
    device, dtype = resolve_device(a.device, a.dtype)

    from weights.load import load_model  # heavy imports after argument checks: errors come fast
    from weights.tokenizer import StreamDecoder
    t = time.perf_counter()
    m = load_model(a.model, device, dtype, log=log)
    log(f"loaded {m.name} ({m.args.n_layers} layers, dim {m.args.dim}) on {device} as "
        f"{str(dtype).removeprefix('torch.')} in {time.perf_counter() - t:.1f} s")

    limit = min(a.ctx, m.args.max_seq_len - a.max_new_tokens)
    if limit <= 0:
        raise ValueError(f"--max-new-tokens {a.max_new_tokens} leaves no room in the model's "
                         f"{m.args.max_seq_len}-token context")
    haystack = None
    if text is None:
        if limit < a.ctx:
            log(f"warning: --ctx {a.ctx} + {a.max_new_tokens} new tokens exceeds {m.name}'s context of "
                f"{m.args.max_seq_len}; using a {limit}-token haystack")
        haystack = make_haystack(m.tokenizer, limit, depth=a.depth, seed=a.seed)
        ids = haystack.ids
        log(f"pass-key demo: {len(ids)}-token haystack, key {haystack.key} at depth {haystack.depth:.2f}")
    else:
        if a.chat:
            text = m.tokenizer.apply_chat_template([{"role": "user", "content": text}])
            ids = m.tokenizer.encode(text, bos=False)  # the template writes its own special tokens
        else:
            ids = m.tokenizer.encode(text)
        ids, cut = fit_prompt(ids, limit)
        if cut:
            log(f"warning: prompt is {len(ids) + cut} tokens, over the limit of {limit}; "
                f"cut {cut} tokens from its middle")

    from tqdm import tqdm
    elem = torch.empty((), dtype=dtype).element_size()
    specs = policy_spec(a) if a.policy != "hybrid" else hybrid_specs(a, m, ids, elem, log)
    bar = tqdm(total=m.args.n_layers, desc=f"prefill {len(ids)} tokens", unit="layer", file=sys.stderr,
               disable=None if len(ids) >= 1024 else True, leave=False)
    stream = StreamDecoder(m.tokenizer)
    eos = m.tokenizer.eos_ids

    def on_token(tid: int) -> None:  # stream the text; the end-of-turn token itself is not shown
        if tid not in eos:
            print(stream.push(tid), end="", flush=True)

    res = generate(m.model, ids, a.max_new_tokens, sampling, specs, eos,
                   on_token=on_token, on_layer=bar.update, prefill_chunk=a.prefill_chunk,
                   cuda_graphs=not a.no_cuda_graphs)
    bar.close()
    print(stream.flush(), flush=True)

    text_out = m.tokenizer.decode([t for t in res.generated_ids if t not in eos])
    kv = res.kv_bytes()
    n_tokens = res.prompt_tokens + len(res.generated_ids)
    full = m.args.kv_bytes_per_token(elem) * n_tokens
    log(f"prompt {res.prompt_tokens} tokens | prefill {res.prefill_s:.2f} s "
        f"({res.prompt_tokens / max(res.prefill_s, 1e-9):.0f} tok/s) | decode {res.decode_ms_per_token:.1f} ms/token "
        f"({len(res.generated_ids)} tokens, {res.stop_reason}{', CUDA graph' if res.cuda_graphs else ''}) | KV device {fmt_bytes(kv['device'])}, "
        f"host {fmt_bytes(kv['host'])} (FullKV {fmt_bytes(full)})")
    if haystack is not None:
        log(f"pass key {haystack.key}: {'retrieved' if haystack.found(text_out) else 'NOT retrieved'}")
    if a.stats_json:
        stats = {
            "model": m.name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "policy": a.policy, "ctx": a.ctx, "prompt_tokens": res.prompt_tokens,
            "generated_ids": res.generated_ids, "text": text_out, "stop_reason": res.stop_reason,
            "prefill_s": res.prefill_s, "decode_ms_per_token": res.decode_ms_per_token,
            "decode_steps": len(res.decode_times_s), "cuda_graphs": res.cuda_graphs,
            "kv_bytes": kv, "full_kv_bytes": full, "peak_memory_bytes": peak_memory_bytes(device),
            "layers": [p.describe() for p in res.policies],
            "passkey": None if haystack is None else {
                "key": haystack.key, "depth": haystack.depth, "retrieved": haystack.found(text_out)},
        }
        with open(a.stats_json, "w") as f:
            json.dump(stats, f, indent=1)
    return 0


def cli(parser: argparse.ArgumentParser, run_fn, argv: list[str] | None) -> int:
    """Parse, run, and turn bad input (ValueError) or file trouble (OSError) into one line."""
    a = parser.parse_args(argv)
    try:
        return run_fn(a)
    except (ValueError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
