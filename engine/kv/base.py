"""The KV policy contract: what every per-layer cache (full, quantized, offloaded, evicted) implements.

The model hands each layer's keys and values to that layer's policy and asks it for attention
outputs; it never looks inside and never branches on the policy type. Policies own both storage and
attention math, because a quantized or sparse cache attends differently from a dense one.

Shapes use native KV heads (GQA): K/V are (B, H_kv, T, D), never expanded to the H query heads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.config import ModelArgs


class KVPolicy:
    name = "base"
    # How many of the prompt's last queries prefill() wants (scoring policies use them); 0 = none.
    q_window = 0

    def __init__(self, args: ModelArgs, layer: int, capacity: int, device: torch.device,
                 dtype: torch.dtype):
        self.args, self.layer, self.capacity = args, layer, capacity
        self.device, self.dtype = torch.device(device), dtype
        self.length = 0  # tokens seen so far (prompt + generated), whatever is actually kept

    def prefill(self, k: torch.Tensor, v: torch.Tensor, q_window: torch.Tensor | None) -> None:
        """Take the prompt's K/V (B, H_kv, T, D), RoPE applied, and its last queries (B, H, w, D)."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Decode: append one token's k/v (B, H_kv, 1, D), return attention for q (B, H, 1, D)."""
        raise NotImplementedError

    def nbytes(self) -> dict[str, int]:
        """Exact bytes held, by memory tier: {"device": ..., "host": ...}."""
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-able one-line description: the policy and its parameters."""
        return {"policy": self.name}

    # Whether attend_at() exists: the decode step can then be captured in a CUDA graph.
    graphable = False

    def attend_at(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                  pos: torch.Tensor) -> torch.Tensor:
        """attend() for a CUDA graph: the token's absolute position comes as a (1,) int64 device
        tensor and no shape or launch may depend on a host-side counter (graph replays skip the
        host). The host-side bookkeeping of the step is left to advance()."""
        raise NotImplementedError

    def advance(self) -> None:
        """Host-side counters for one decode step done by attend_at (called after each replay)."""

    def finish_step(self) -> None:
        """End of a decode step: a policy joins any copy still in flight (a graph must not end with
        work forked onto another stream)."""

    def wants_lookahead(self) -> bool:
        """True if this layer wants `prepare(q_hat)` before its turn (see OffloadKV's lookahead)."""
        return False

    def prepare(self, q_hat: torch.Tensor) -> None:
        """Receive an approximate query (B, H, 1, D) for the coming step, made one layer early from
        the previous layer's input; a policy may start fetching with it."""

    def transfer_bytes(self) -> int:
        """Bytes copied from host to device memory so far (only offloading policies copy)."""
        return 0


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_probs: bool = False):
    """Dense attention of new queries over cached keys, grouped-query aware, no causal mask needed
    (every cached key is in the past).

    q: (B, H, Tq, D); k, v: (B, H_kv, T, D) -> (B, H, Tq, D), plus the attention probabilities
    (B, H_kv, n_rep*Tq, T) if return_probs (eviction policies score tokens with them).
    The H query heads are folded into (H_kv, n_rep) groups so each KV head is read once,
    instead of materialising repeat_kv copies of the cache.
    """
    B, H, Tq, D = q.shape
    H_kv = k.shape[1]
    if q.is_cuda and not return_probs:
        # cuBLAS runs these 4-row batched GEMMs far below memory bandwidth at long context (0.3-1 ms
        # per layer at 32k on an H100, measured); SDPA's fused kernels read K/V once at full speed.
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=H != H_kv)
    qg = q.reshape(B, H_kv, (H // H_kv) * Tq, D)  # (B, H_kv, n_rep*Tq, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (1.0 / math.sqrt(D))  # (B, H_kv, n_rep*Tq, T)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    out = torch.matmul(probs, v).reshape(B, H, Tq, D)  # (B, H_kv, n_rep*Tq, D) -> (B, H, Tq, D)
    return (out, probs) if return_probs else out
