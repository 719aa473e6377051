"""KV cache policies, one object per layer. `POLICIES` is the single place names map to classes;
`parse_policy` reads the `name:key=value,...` form that the CLIs and the Python API share."""
from __future__ import annotations

import torch

from engine.config import ModelArgs
from engine.kv.base import KVPolicy
from engine.kv.evict import BudgetedEvictKV
from engine.kv.full import FullKV
from engine.kv.offload import OffloadKV
from engine.kv.quant import QuantKV

POLICIES: dict[str, type[KVPolicy]] = {"full": FullKV, "quant": QuantKV, "offload": OffloadKV,
                                       "evict": BudgetedEvictKV}


def policy_class(spec: dict) -> type[KVPolicy]:
    name = spec.get("policy")
    if name not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name]


def build_policies(args: ModelArgs, specs: list[dict] | dict, capacity: int,
                   device: torch.device | str, dtype: torch.dtype) -> list[KVPolicy]:
    """One policy per layer. `specs` is one dict for every layer or a list of per-layer dicts,
    each {"policy": name, **params}."""
    if isinstance(specs, dict):
        specs = [specs] * args.n_layers
    if len(specs) != args.n_layers:
        raise ValueError(f"{len(specs)} layer specs for a {args.n_layers}-layer model")
    policies = []
    for layer, spec in enumerate(specs):
        check_spec(spec, f"layer {layer}")
        params = {k: v for k, v in spec.items() if k != "policy"}
        policies.append(policy_class(spec)(args, layer, capacity, device, dtype, **params))
    return policies


def check_spec(spec: dict, where: str) -> None:
    """A spec dict (from a plan file or the API): a known policy, known parameters, and values of
    the types its constructor's defaults have; ValueError naming `where` otherwise. Ranges are the
    constructor's to check (they may depend on the model)."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a policy spec must be a dict, got {type(spec).__name__}")
    name = spec.get("policy")
    if name not in POLICIES:
        raise ValueError(f"{where}: unknown KV policy {name!r}; choose from {', '.join(POLICIES)}")
    defaults = POLICIES[name].defaults()
    for key, value in spec.items():
        if key == "policy":
            continue
        if key not in defaults:
            raise ValueError(f"{where}: {name} has no parameter {key!r} ({', '.join(defaults) or 'none'})")
        default = defaults[key]
        if default is None and value is None:  # "choose for me", e.g. QuantKV's group
            continue
        kind = type(default) if isinstance(default, (bool, str, float)) else int
        ok = isinstance(value, (int, float) if kind is float else kind)  # a fraction may be written 0
        if not ok or (kind in (int, float) and isinstance(value, bool)):
            want = {bool: "true or false", str: "a word", int: "a whole number", float: "a number"}[kind]
            raise ValueError(f"{where}: {name} {key}={value!r} is not {want}")


def spec_cost(args: ModelArgs, spec: dict, prompt: int, new: int, elem: int) -> dict[str, int]:
    """Bytes by tier {"device", "host"} that the policy `spec` will hold: the policy's own cost."""
    return policy_class(spec).cost(args, prompt, new, elem, **{k: v for k, v in spec.items() if k != "policy"})


def parse_policy(text: str, others: str = "") -> dict:
    """A policy as written on a command line -> a spec for build_policies:
    'full', 'quant:bits=2,residual=128', 'offload:budget=256,lookahead=layer'. Keys and value
    types are checked against the policy's constructor (the one place its defaults live).
    `others`: what the caller also accepts, for the error's list (e.g. "hybrid or plan:PATH")."""
    name, _, params = text.strip().partition(":")
    if name not in POLICIES:
        also = f", {others}" if others else ""
        raise ValueError(f"unknown KV policy {name!r}; choose from {', '.join(POLICIES)}{also}")
    spec: dict = {"policy": name}
    defaults = POLICIES[name].defaults()
    for kv in filter(None, (p.strip() for p in params.split(","))):
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"policy {text!r}: expected key=value, got {kv!r}")
        if key not in defaults:
            raise ValueError(f"policy {text!r}: {name} has no parameter {key!r} ({', '.join(defaults)})")
        default = defaults[key]
        if isinstance(default, bool):  # a switch, e.g. evict_during_decode=1
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"policy {text!r}: {key}={value!r} is not a yes/no value (1, 0, true, false)")
            spec[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, str):  # a word, e.g. offload's lookahead=layer
            spec[key] = value
        elif isinstance(default, float):  # a fraction, e.g. quant's heavy=0.02
            try:
                spec[key] = float(value)
            except ValueError:
                raise ValueError(f"policy {text!r}: {key}={value!r} is not a number") from None
        else:
            try:
                spec[key] = int(value)
            except ValueError:
                raise ValueError(f"policy {text!r}: {key}={value!r} is not a whole number") from None
    return spec
