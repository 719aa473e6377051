"""FullKV: the uncompressed cache every other policy is checked against.

Storage is preallocated for the whole run (prompt + new tokens) and written in place, so a decode
step costs one row write plus one pass over the keys and values: no torch.cat, no reallocation.
"""
from __future__ import annotations

import torch

from engine.kv.base import KVPolicy, decode_attention, tensor_bytes
from kernels.dense_attn import dense_decode_attention


class FullKV(KVPolicy):
    name = "full"
    graphable = True

    def __init__(self, args, layer, capacity, device, dtype, batch: int = 1):
        super().__init__(args, layer, capacity, device, dtype)
        shape = (batch, args.n_kv_heads, capacity, args.head_dim)  # (B, H_kv, T_max, D)
        self.k = torch.empty(shape, device=self.device, dtype=dtype)
        self.v = torch.empty(shape, device=self.device, dtype=dtype)

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"FullKV layer {self.layer}: {end} tokens exceed capacity {self.capacity}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end

    def prefill(self, k, v, q_window=None):
        self._write(k, v)

    def attend(self, q, k_new, v_new):
        self._write(k_new, v_new)
        return decode_attention(q, self.k[:, :, :self.length], self.v[:, :, :self.length])

    def attend_at(self, q, k_new, v_new, pos):
        # FullKV keeps every token at its own position: row == position.
        self.k.index_copy_(2, pos, k_new)
        self.v.index_copy_(2, pos, v_new)
        return dense_decode_attention(q, self.k, self.v, pos + 1)

    def advance(self):
        self.length += 1

    def nbytes(self):
        return {"device": tensor_bytes(self.k, self.v), "host": 0}

    def describe(self):
        return {"policy": self.name, "capacity": self.capacity}
