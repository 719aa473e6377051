"""The KV policy contract: what every per-layer cache (full, quantized, offloaded, evicted) implements.

The model hands each layer's keys and values to that layer's policy and asks it for attention
outputs; it never looks inside and never branches on the policy type. Policies own both storage and
attention math, because a quantized or sparse cache attends differently from a dense one.

One decode path, the same eagerly and inside a CUDA graph (engine/graphs.py):
    runner:  before_step()  on the host, outside any graph: counters, capacity, work whose size or
                            schedule the host decides (QuantKV's key-block flush every R steps);
    graph:   attend(q, k_new, v_new, pos)  device work only: the token's position is a (1,) int64
                            device tensor and no launch depends on a host counter that changes
                            from one step to the next (a replay skips the host entirely).
So a decode step is: before_step() for every layer, then the model's step (eager or replayed).

Shapes use native KV heads (GQA): K/V are (B, H_kv, T, D), never expanded to the H query heads.
"""
from __future__ import annotations

import inspect

import torch

from engine.config import ModelArgs


class KVPolicy:
    name = "base"
    # How many of the prompt's last queries prefill() wants (scoring policies use them); 0 = none.
    q_window = 0
    # Whether decode steps may be captured in a CUDA graph (False: a policy that records on the host).
    graphable = True

    def __init__(self, args: ModelArgs, layer: int, capacity: int, device: torch.device | str,
                 dtype: torch.dtype):
        self.args, self.layer, self.capacity = args, layer, capacity
        self.device, self.dtype = torch.device(device), dtype
        self.length = 0  # tokens seen so far (prompt + generated), whatever is actually kept

    # ---- the contract ------------------------------------------------------------------------------
    def prefill(self, k: torch.Tensor, v: torch.Tensor, q_window: torch.Tensor | None) -> None:
        """Take the prompt's K/V (B, H_kv, T, D), RoPE applied, and its last queries (B, H, w, D)."""
        raise NotImplementedError

    def before_step(self) -> None:
        """Host side of one decode step, called before it: check capacity, count the token the step
        will append, and do any host-scheduled work (never inside a graph)."""
        if self.length + 1 > self.capacity:
            raise RuntimeError(f"{type(self).__name__} layer {self.layer}: capacity {self.capacity} exceeded")
        self.length += 1

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               pos: torch.Tensor) -> torch.Tensor:
        """Decode: store one token's k/v (B, H_kv, 1, D) at position `pos` ((1,) int64, on the
        device) and return attention for q (B, H, 1, D) over everything kept, the token included."""
        raise NotImplementedError

    def nbytes(self) -> dict[str, int]:
        """Exact bytes held, by memory tier: {"device": ..., "host": ...}."""
        raise NotImplementedError

    @classmethod
    def cost(cls, args: ModelArgs, prompt: int, new: int, elem: int, **params) -> dict[str, int]:
        """Bytes by tier that this policy will hold for a `prompt`-token prompt and `new` decoded
        tokens, with these parameters (the constructor's defaults for the rest): what the planner
        prices. It must equal nbytes() after the run (tests check it)."""
        return cls._cost(args, prompt, new, elem, **{**cls.defaults(), **params})

    @classmethod
    def _cost(cls, args: ModelArgs, prompt: int, new: int, elem: int, **params) -> dict[str, int]:
        """cost() with every parameter given (keyword-only, no defaults: those live in __init__)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-able one-line description: the policy and its parameters."""
        return {"policy": self.name}

    # ---- optional hooks --------------------------------------------------------------------------------
    def finish_step(self) -> None:
        """End of a decode step, on the device: join any copy still in flight (a CUDA graph must not
        end with work forked onto another stream)."""

    def wants_lookahead(self) -> bool:
        """True if this layer wants `prepare(q_hat)` before its turn (see OffloadKV's lookahead)."""
        return False

    def prepare(self, q_hat: torch.Tensor) -> None:
        """Receive an approximate query (B, H, 1, D) for the coming step, made one layer early from
        the previous layer's input; a policy may start fetching with it."""

    def transfer_bytes(self) -> int:
        """Bytes copied from host to device memory so far (only offloading policies copy)."""
        return 0

    @classmethod
    def defaults(cls) -> dict:
        """The parameters this policy takes and their defaults: read from the constructor, the one
        place defaults live."""
        skip = {"self", "args", "layer", "capacity", "device", "dtype"}
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if k not in skip and p.default is not inspect.Parameter.empty}


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
