"""Sparse attention helpers for OffloadKV: approximate scores from a key-channel sketch, and top-k
token selection. (The exact attention over the selected tokens is dense attention over a contiguous
device buffer, engine.kv.base.decode_attention, because OffloadKV keeps that buffer in token order.)

approx_scores has a Triton kernel: it fuses picking the query's sketch channels, the dot products
with the sketch, and the max over the query heads that share a KV head, so the (H, M) score matrix
per query head is never written out; the sketch (M x C per KV head) is read once.
top-k uses torch.topk, already a tuned GPU kernel: a hand-written one would not pay.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import use_triton


def approx_scores_ref(q: torch.Tensor, sketch: torch.Tensor, chan: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, D); sketch (B, H_kv, M, C) = keys at channels chan (B, H_kv, C)
    -> (B, H_kv, M) float32: for each token, the max over the KV head's query heads of q[C] . k[C]."""
    B, H, _, D = q.shape
    H_kv = chan.shape[1]
    qg = q.reshape(B, H_kv, H // H_kv, D).float()  # (B, H_kv, n_rep, D)
    qc = qg.gather(-1, chan[:, :, None, :].expand(-1, -1, H // H_kv, -1))  # (B, H_kv, n_rep, C)
    scores = torch.matmul(qc, sketch.float().transpose(-1, -2))  # (B, H_kv, n_rep, M)
    return scores.amax(dim=2)


@triton.jit
def _approx_scores_kernel(q_ptr, sk_ptr, ch_ptr, out_ptr, M, H_KV,
                          s_qb, s_qh, s_sb, s_sh, s_sm, s_cb, s_ch, s_ob, s_oh,
                          N_REP: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H_KV, pid_bh % H_KV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, C)
    mask_m = offs_m < M
    chan = tl.load(ch_ptr + b * s_cb + h * s_ch + offs_c)  # (C,) channel ids of this KV head
    sk = tl.load(sk_ptr + b * s_sb + h * s_sh + offs_m[:, None] * s_sm + offs_c[None, :],
                 mask=mask_m[:, None], other=0.0).to(tl.float32)  # (BLOCK_M, C)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for r in range(N_REP):  # the query heads that share this KV head
        qc = tl.load(q_ptr + b * s_qb + (h * N_REP + r) * s_qh + chan).to(tl.float32)  # (C,)
        best = tl.maximum(best, tl.sum(sk * qc[None, :], axis=1))
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_m, best, mask=mask_m)


def approx_scores_triton(q: torch.Tensor, sketch: torch.Tensor, chan: torch.Tensor) -> torch.Tensor:
    B, H, _, D = q.shape
    _, H_kv, M, C = sketch.shape
    if C & (C - 1):
        raise ValueError(f"the Triton approx_scores kernel needs a power-of-two channel count, got {C}")
    q = q.reshape(B, H, D).contiguous()
    sketch = sketch if sketch.stride(-1) == 1 else sketch.contiguous()
    chan = chan.contiguous()
    out = torch.empty(B, H_kv, M, device=q.device, dtype=torch.float32)
    BLOCK_M = 128
    grid = (B * H_kv, triton.cdiv(M, BLOCK_M))
    _approx_scores_kernel[grid](q, sketch, chan, out, M, H_kv, q.stride(0), q.stride(1),
                                sketch.stride(0), sketch.stride(1), sketch.stride(2),
                                chan.stride(0), chan.stride(1), out.stride(0), out.stride(1),
                                N_REP=H // H_kv, C=C, BLOCK_M=BLOCK_M)
    return out


def approx_scores(q, sketch, chan):
    if use_triton(q) and not (sketch.shape[-1] & (sketch.shape[-1] - 1)):
        return approx_scores_triton(q, sketch, chan)
    return approx_scores_ref(q, sketch, chan)


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (B, H_kv, M) -> (B, H_kv, k) indices of the k largest, sorted by position (so the
    device buffer stays in token order and set differences are a searchsorted away)."""
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
