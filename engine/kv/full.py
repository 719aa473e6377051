"""FullKV: the uncompressed cache every other policy is checked against.

Storage is preallocated for the whole run (prompt + new tokens) and written in place, so a decode
step costs one row write plus one pass over the keys and values: no torch.cat, no reallocation.
"""
from __future__ import annotations

import torch

from engine.kv.base import KVPolicy, tensor_bytes
from kernels.dense_attn import dense_decode_attention, write_row


class FullKV(KVPolicy):
    name = "full"

    def __init__(self, args, layer, capacity, device, dtype, store: str = "model"):
        super().__init__(args, layer, capacity, device, dtype)
        self.store = self.store_dtype(store, dtype)
        self.k = self.v = None  # (B, H_kv, capacity, D) in self.store, allocated at prefill (B from the prompt)

    @staticmethod
    def store_dtype(store: str, dtype: torch.dtype) -> torch.dtype:
        """'model' -> the model's dtype; 'bfloat16' / 'float16' / 'float32' -> that dtype."""
        if store == "model":
            return dtype
        if store not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"FullKV store must be model, bfloat16, float16 or float32, got {store!r}")
        return getattr(torch, store)

    def prefill(self, k, v, q_window=None):
        B, H_kv, T, D = k.shape
        if T > self.capacity:
            raise RuntimeError(f"FullKV layer {self.layer}: {T} tokens exceed capacity {self.capacity}")
        self.k = torch.empty(B, H_kv, self.capacity, D, device=self.device, dtype=self.store)
        self.v = torch.empty_like(self.k)
        self.k[:, :, :T], self.v[:, :, :T] = k, v
        self.length = T

    def attend(self, q, k_new, v_new, pos):
        # FullKV keeps every token at its own position: row == position.
        write_row(self.k, self.v, k_new, v_new, pos)
        return dense_decode_attention(q, self.k, self.v, pos)  # a store of another dtype is read as q's

    def nbytes(self):
        return {"device": tensor_bytes(self.k, self.v), "host": 0}

    @classmethod
    def _cost(cls, args, prompt, new, elem, *, store):
        if store != "model":  # elem is the model dtype's size; a store of another dtype has its own
            elem = cls.store_dtype(store, torch.float32).itemsize
        return {"device": (prompt + new) * 2 * args.n_kv_heads * args.head_dim * elem, "host": 0}

    def describe(self):
        out = {"policy": self.name, "capacity": self.capacity}
        return out if self.store == self.dtype else {**out, "store": str(self.store).removeprefix("torch.")}
