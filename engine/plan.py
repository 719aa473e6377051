"""A plan: one KV policy per layer, with the bytes and quality the planner (engine/planner.py)
priced each at, and plans on disk as JSON, one readable line per layer:

    {
      "model": "smollm2-135m-instruct",
      "n_layers": 30,
      "context": 4096,
      "mode": "hybrid",
      "kv_budget_bytes": 19021824,
      ...
      "layers": [
        {"layer": 0, "policy": "quant", "bits": 4, ..., "quality": 0.9659, "device_bytes": 1187596, "host_bytes": 0},
        ...
      ]
    }

(docs/plans/smollm2_hybrid_quant_10pct.json, shortened.) A row is the policy spec (what
build_policies takes) plus the planner's figures; `Plan.load` checks every spec as `--policy`
would, so a hand-edited plan fails naming the layer and the key at fault.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from engine.config import ModelArgs
from engine.kv import build_policies, check_spec, parse_policy
from engine.layer_stats import LayerStats


@dataclass
class Option:
    spec: dict          # policy parameters, as build_policies takes them
    device_bytes: int
    host_bytes: int
    quality: float



_NOT_SPEC = ("layer", "quality", "device_bytes", "host_bytes")


@dataclass
class Plan:
    """One KV policy per layer, with the bytes and quality the planner priced it at. `header` says
    what it was made for (model, context, budget, ...); `stats` are the profile it came from, when
    made in this process (not saved)."""
    layers: list[Option]
    header: dict = field(default_factory=dict)
    stats: list[LayerStats] | None = field(default=None, repr=False)
    source: str = field(default="plan", repr=False)  # what errors name: the file it was loaded from

    @property
    def specs(self) -> list[dict]:
        return [o.spec for o in self.layers]

    @property
    def device_bytes(self) -> int:
        return sum(o.device_bytes for o in self.layers)

    def summary(self) -> str:
        """e.g. '12 evict, 10 offload, 8 full layers'."""
        counts: dict[str, int] = {}
        for o in self.layers:
            counts[o.spec["policy"]] = counts.get(o.spec["policy"], 0) + 1
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + " layers"

    def check(self, model: str, n_layers: int, source: str | None = None) -> None:
        """Refuse a plan made for another model or depth (the error names `source`, default self.source)."""
        source = source or self.source
        if self.header.get("model") != model:
            raise ValueError(f"{source}: plan was made for model {self.header.get('model')!r}, not {model!r}")
        if len(self.layers) != n_layers:
            raise ValueError(f"{source}: plan has {len(self.layers)} layers, the model has {n_layers}")

    def save(self, path: str) -> None:
        lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in self.header.items()]
        lines.append('  "layers": [')
        for i, o in enumerate(self.layers):
            row = {"layer": i, **o.spec, "quality": round(o.quality, 4), "device_bytes": o.device_bytes,
                   "host_bytes": o.host_bytes}
            lines.append(f"    {json.dumps(row)}{',' if i + 1 < len(self.layers) else ''}")
        lines += ["  ]", "}"]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    @classmethod
    def load(cls, path: str) -> "Plan":
        try:
            with open(path) as f:
                raw = json.load(f)
            layers = [Option({k: v for k, v in row.items() if k not in _NOT_SPEC}, int(row.get("device_bytes", 0)),
                             int(row.get("host_bytes", 0)), float(row.get("quality", 0.0))) for row in raw["layers"]]
            if not all(isinstance(o.spec.get("policy"), str) for o in layers):
                raise KeyError("policy")
            for i, o in enumerate(layers):
                check_spec(o.spec, f"{path}: layer {i}")
        except OSError as e:
            raise ValueError(f"cannot read plan {path}: {e.strerror}") from None
        except ValueError as e:
            if str(e).startswith(f"{path}: layer"):
                raise  # check_spec's own sentence
            raise ValueError(f"{path}: not a KV plan ({type(e).__name__}: {e})") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a KV plan ({type(e).__name__}: {e})") from None
        return cls(layers, {k: v for k, v in raw.items() if k != "layers"}, source=path)


def policy_specs(policy, model: str, args: ModelArgs) -> list[dict]:
    """Every form of a policy but "hybrid" (which needs a profile: LLM.policy_specs) -> one spec per
    layer of the model named `model` with `args`, every value checked: "name:key=value,...",
    "plan:PATH", a Plan, a spec dict, or one string or dict per layer. Needs no weights, so the
    CLIs run it before loading them. The constructors do the checking (policies allocate nothing
    until prefill), with the messages a run would give."""
    if isinstance(policy, str) and policy.strip() == "hybrid":
        raise ValueError("policy 'hybrid' needs a prompt to profile")
    if isinstance(policy, str) and policy.startswith("plan:"):
        policy = Plan.load(policy[len("plan:"):])
    if isinstance(policy, Plan):
        policy.check(model, args.n_layers)  # an error names the file a loaded plan came from
        specs = policy.specs
    elif isinstance(policy, (str, dict)):
        spec = parse_policy(policy, others="hybrid or plan:PATH") if isinstance(policy, str) else dict(policy)
        specs = [spec] * args.n_layers
    elif isinstance(policy, (list, tuple)):
        if not all(isinstance(p, (str, dict)) for p in policy):
            raise ValueError("per-layer specs are strings or dicts, e.g. ['quant:bits=4', {'policy': 'full'}]")
        specs = [parse_policy(p) if isinstance(p, str) else dict(p) for p in policy]
    else:
        raise ValueError(f"not a KV policy: {policy!r}")
    build_policies(args, specs, 1, "cpu", torch.float32)
    return specs
