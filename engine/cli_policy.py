"""generate.py's KV-policy flags: --policy, the flags of a hybrid that plans for itself, and one flag
per policy parameter (--kv-bits, --budget, ...), and their translation into the one policy string
the API takes: `--policy quant --kv-bits 2 --kv-sink 4` -> "quant:bits=2,sink=4"."""
from __future__ import annotations

import argparse

from engine.cli import parse_tokens
from engine.kv import POLICIES
from engine.kv.quant import CLIP, ROTATE

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


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    """--policy, --plan and the hybrid's planning flags, then the per-parameter flags (help shows each
    parameter's default, read from the policy's constructor)."""
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
                   help="hybrid without --plan: device KV budget, bytes (512MiB, 2GiB, or a whole number above 1) "
                        "or a fraction of FullKV (0.2, 20%%; 1 is all of it) (default 0.2)")
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
                   f"ranks tokens, as 4-bit codes ({_default('offload', 'channels')}: head_dim / 4)")
    p.add_argument("--chunk", type=int, help="offload: rank and fetch the prompt in chunks of this many tokens "
                   f"({_default('offload', 'chunk')})")
    p.add_argument("--lookahead", choices=["none", "layer", "step"],
                   help="offload: pick each step's tokens with this step's query (none: exact), an approximate "
                        "query one layer early (layer), or the previous step's query (step); the last two let "
                        "the copy overlap compute (default none: it measured as fast on an H100, see docs/RESULTS.md)")
    p.add_argument("--host-store", choices=["model", "8bit"],
                   help="offload: keep the offloaded tokens in host memory as the model's values or as 8-bit "
                        "codes (half the PCIe bytes and host memory of bfloat16, a small error; "
                        f"{_default('offload', 'host')})")


# Flags of a hybrid that plans for itself: flag -> default. Given with another policy or with --plan,
# they would change nothing, so they are refused rather than ignored.
PLANNING_FLAGS = {"kv_budget": "0.2", "plan_policies": "auto", "profile_tokens": "auto"}


def policy_arg(a: argparse.Namespace) -> str:
    """--policy and the per-parameter flags -> one 'name:key=value,...' policy for the API. Fills
    in the planning flags' defaults."""
    a.policy = a.policy.strip()
    name = a.policy.partition(":")[0]
    if name not in POLICIES and name != "hybrid":
        raise ValueError(f"unknown --policy {name!r}; choose from {', '.join(POLICIES)} or hybrid")
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
