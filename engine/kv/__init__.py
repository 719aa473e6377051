"""KV cache policies, one object per layer. `build_policies` is the single place names map to classes."""
from __future__ import annotations

import inspect

import torch

from engine.config import ModelArgs
from engine.kv.base import KVPolicy
from engine.kv.evict import BudgetedEvictKV
from engine.kv.full import FullKV
from engine.kv.offload import OffloadKV
from engine.kv.quant import QuantKV

POLICIES: dict[str, type[KVPolicy]] = {"full": FullKV, "quant": QuantKV, "offload": OffloadKV,
                                       "evict": BudgetedEvictKV}


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
        params = dict(spec)
        name = params.pop("policy")
        if name not in POLICIES:
            raise ValueError(f"unknown KV policy {name!r}; choose from {', '.join(POLICIES)}")
        policies.append(POLICIES[name](args, layer, capacity, device, dtype, **params))
    return policies


def parse_policy(text: str, model_name: str, n_layers: int) -> dict | list[dict]:
    """A policy written on a command line -> build_policies' specs: 'full', 'quant:bits=2,residual=128',
    'offload:budget=256,lookahead=layer', or 'plan:PATH' (a per-layer plan from profile_layers.py, checked against the model)."""
    name, _, params = text.partition(":")
    if name == "plan":
        from engine.planner import load_plan
        return load_plan(params, model_name, n_layers)[1]
    if name not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; choose from {', '.join(POLICIES)} or plan:PATH")
    spec: dict = {"policy": name}
    defaults = {k: v.default for k, v in inspect.signature(POLICIES[name].__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}  # the parameters a policy takes
    for kv in filter(None, params.split(",")):
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"policy {text!r}: expected key=value, got {kv!r}")
        if key not in defaults:
            raise ValueError(f"policy {text!r}: {name} has no parameter {key!r} ({', '.join(defaults)})")
        if isinstance(defaults[key], str):  # a word, e.g. offload's lookahead=layer
            spec[key] = value
            continue
        try:
            spec[key] = float(value) if "." in value else int(value)
        except ValueError:
            raise ValueError(f"policy {text!r}: {key}={value!r} is not a number") from None
    return spec
