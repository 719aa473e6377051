"""BudgetedEvictKV: keep a fixed number of tokens per layer, chosen at prefill by how much the
prompt's last queries attend to them (SnapKV, as XKV uses it with per-layer budgets).

Scoring: the last `window` prompt queries attend to every earlier key (causally inside the window);
the probabilities are summed over those queries and over the query heads sharing a KV head, then
average-pooled along the sequence (kernel `pool`) so neighbours of an important token survive too
(a number's digits, a name's pieces). Each KV head keeps its own top `budget - window` tokens plus
the window itself, stored in token order. Decode appends. With `evict_during_decode` the cache
stays at `budget` tokens during long generations: each new token replaces the kept token with the
least attention mass accumulated over decode steps (H2O-style), never one of the `window` newest.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.kv.base import KVPolicy, decode_attention, tensor_bytes
from kernels.dense_attn import dense_decode_attention


def window_scores(k: torch.Tensor, q_window: torch.Tensor, pool: int) -> torch.Tensor:
    """k (B, H_kv, T, D), q_window (B, H, w, D): the last w queries of the prompt
    -> (B, H_kv, T) float32 pooled attention mass per key, summed over the window and the group."""
    B, H_kv, T, D = k.shape
    H, w = q_window.shape[1], q_window.shape[2]
    qg = q_window.reshape(B, H_kv, (H // H_kv) * w, D).float()  # (B, H_kv, n_rep*w, D), rows (head, query)
    logits = torch.matmul(qg, k.float().transpose(-1, -2)) / math.sqrt(D)  # (B, H_kv, n_rep*w, T)
    # window query i sits at position T - w + i and must not see keys after it
    q_pos = torch.arange(T - w, T, device=k.device).repeat(H // H_kv)  # (n_rep*w,)
    future = torch.arange(T, device=k.device)[None, :] > q_pos[:, None]  # (n_rep*w, T)
    probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
    mass = probs.sum(dim=2)  # (B, H_kv, T)
    if pool > 1:
        mass = F.avg_pool1d(mass.reshape(B * H_kv, 1, T), pool, stride=1, padding=pool // 2,
                            count_include_pad=False).reshape(B, H_kv, T)
    return mass


class BudgetedEvictKV(KVPolicy):
    name = "evict"

    def __init__(self, args, layer, capacity, device, dtype, budget: int = 512, window: int = 32,
                 pool: int = 7, evict_during_decode: bool = False):
        super().__init__(args, layer, capacity, device, dtype)
        if budget < 1 or window < 1:
            raise ValueError(f"BudgetedEvictKV budget and window must be >= 1, got {budget}, {window}")
        if budget < window:
            raise ValueError(f"BudgetedEvictKV budget {budget} < window {window}")
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"BudgetedEvictKV pool must be an odd kernel size, got {pool}")
        self.budget, self.window, self.pool = budget, window, pool
        self.evict_during_decode = bool(evict_during_decode)
        self.q_window = window
        self.k = self.v = None  # (B, H_kv, n_max, D)
        self.n = 0              # tokens held
        self.pos = self.acc = None  # decode-time eviction: token position and accumulated mass per slot

    def prefill(self, k, v, q_window=None):
        B, H_kv, T, D = k.shape
        if self.evict_during_decode:  # never more than `budget` tokens
            n_max = min(self.budget, self.capacity)
        else:  # what prefill keeps + every token yet to be generated
            n_max = min(T, self.budget) + (self.capacity - T)
        self.k = torch.empty(B, H_kv, n_max, D, device=self.device, dtype=self.dtype)
        self.v = torch.empty_like(self.k)
        if T <= self.budget:  # everything fits: keep it all, in order
            keep = torch.arange(T, device=k.device).expand(B, H_kv, T)
            self.k[:, :, :T], self.v[:, :, :T] = k, v
        else:
            w = min(self.window, T)
            mass = window_scores(k, q_window, self.pool)[:, :, :T - w]  # candidates: before the window
            top = mass.topk(self.budget - w, dim=-1).indices.sort(dim=-1).values  # (B, H_kv, budget - w)
            keep = torch.cat([top, torch.arange(T - w, T, device=k.device).expand(B, H_kv, w)], dim=-1)
            idx = keep[..., None].expand(-1, -1, -1, D)
            self.k[:, :, :self.budget] = k.gather(2, idx)
            self.v[:, :, :self.budget] = v.gather(2, idx)
        self.n = keep.shape[-1]
        self.row_offset = self.n - T  # buffer row of position p is p + row_offset (no decode eviction)
        if self.evict_during_decode:
            self.pos = torch.full((B, H_kv, n_max), -1, device=self.device, dtype=torch.long)
            self.pos[:, :, :self.n] = keep
            self.acc = torch.zeros(B, H_kv, n_max, device=self.device, dtype=torch.float32)
        self.length = T

    def attend(self, q, k_new, v_new):
        if self.n < self.k.shape[2]:  # room left: append
            self.k[:, :, self.n], self.v[:, :, self.n] = k_new[:, :, 0], v_new[:, :, 0]
            if self.evict_during_decode:
                self.pos[:, :, self.n] = self.length
            self.n += 1
        elif self.evict_during_decode:  # full: the least-attended token outside the window makes room
            protected = self.pos > self.length - self.window
            slot = self.acc.masked_fill(protected, float("inf")).argmin(dim=-1, keepdim=True)  # (B, H_kv, 1)
            idx = slot[..., None].expand(-1, -1, 1, self.k.shape[-1])
            self.k.scatter_(2, idx, k_new)
            self.v.scatter_(2, idx, v_new)
            self.pos.scatter_(2, slot, self.length)
            self.acc.scatter_(2, slot, 0.0)
        else:
            raise RuntimeError(f"BudgetedEvictKV layer {self.layer}: capacity {self.capacity} exceeded")
        self.length += 1
        k, v = self.k[:, :, :self.n], self.v[:, :, :self.n]
        if not self.evict_during_decode:
            return decode_attention(q, k, v)
        out, probs = decode_attention(q, k, v, return_probs=True)
        self.acc[:, :, :self.n] += probs.float().sum(dim=2)  # mass from every query head of the group
        return out

    @property
    def graphable(self):  # eviction during decode picks slots by data: left to eager steps
        return not self.evict_during_decode

    def attend_at(self, q, k_new, v_new, pos):
        row = pos + self.row_offset
        self.k.index_copy_(2, row, k_new)
        self.v.index_copy_(2, row, v_new)
        return dense_decode_attention(q, self.k, self.v, row + 1)

    def advance(self):
        if self.n >= self.k.shape[2]:
            raise RuntimeError(f"BudgetedEvictKV layer {self.layer}: capacity {self.capacity} exceeded")
        self.n, self.length = self.n + 1, self.length + 1

    def nbytes(self):
        return {"device": tensor_bytes(self.k, self.v, self.pos, self.acc), "host": 0}

    def describe(self):
        d = {"policy": self.name, "budget": self.budget, "window": self.window, "pool": self.pool}
        if self.evict_during_decode:
            d["evict_during_decode"] = True
        return d
