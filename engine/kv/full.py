"""FullKV: the uncompressed cache every other policy is checked against.

Storage is preallocated for the whole run (prompt + new tokens) and written in place, so a decode
step costs one row write plus one pass over the keys and values: no torch.cat, no reallocation.
"""
from __future__ import annotations

import torch

from engine.kv.base import KVPolicy, tensor_bytes
from kernels.dense_attn import dense_decode_attention


class FullKV(KVPolicy):
    name = "full"

    def __init__(self, args, layer, capacity, device, dtype):
        super().__init__(args, layer, capacity, device, dtype)
        self.k = self.v = None  # (B, H_kv, capacity, D), allocated at prefill (B from the prompt)

    def prefill(self, k, v, q_window=None):
        B, H_kv, T, D = k.shape
        if T > self.capacity:
            raise RuntimeError(f"FullKV layer {self.layer}: {T} tokens exceed capacity {self.capacity}")
        self.k = torch.empty(B, H_kv, self.capacity, D, device=self.device, dtype=self.dtype)
        self.v = torch.empty_like(self.k)
        self.k[:, :, :T], self.v[:, :, :T] = k, v
        self.length = T

    def attend(self, q, k_new, v_new, pos):
        # FullKV keeps every token at its own position: row == position.
        self.k.index_copy_(2, pos, k_new)
        self.v.index_copy_(2, pos, v_new)
        return dense_decode_attention(q, self.k, self.v, pos + 1)

    def nbytes(self):
        return {"device": tensor_bytes(self.k, self.v), "host": 0}

    @classmethod
    def cost(cls, args, prompt, new, elem, **params):
        return {"device": (prompt + new) * 2 * args.n_kv_heads * args.head_dim * elem, "host": 0}

    def describe(self):
        return {"policy": self.name, "capacity": self.capacity}
