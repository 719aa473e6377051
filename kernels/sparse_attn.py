"""Sparse attention helpers for OffloadKV: approximate scores from a key-channel sketch, and top-k
selection. (The exact attention over the selected tokens is dense attention over a contiguous
device buffer, kernels.dense_attn, because OffloadKV keeps that buffer in place.)

The sketch holds, for each *chunk* of c consecutive middle-of-prompt tokens and each of C chosen key
channels, the smallest and the largest key value in the chunk (Quest's bound, on a few channels):

    score(chunk) = sum over channels of max(q_c * min_c, q_c * max_c)
                 = q+ . max + q- . min      (q+ = max(q, 0), q- = min(q, 0))

an upper bound of q[C] . k[C] for every token of the chunk. With c = 1, min = max = the token's
keys and the score is q[C] . k[C] itself; the sketch is then stored once (`mn is mx`).

approx_scores has a Triton kernel: it fuses picking the query's sketch channels, the dot products
with the sketch, and the max over the query heads that share a KV head, so the (H, N) score matrix
per query head is never written out; the sketch (N x C per KV head, N chunks) is read once.
top-k uses torch.topk, already a tuned GPU kernel: a hand-written one would not pay.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import use_triton


def sketch_scores(qc: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """qc (..., n, C) queries at the sketch channels; mn, mx (..., N, C) chunk bounds
    -> (..., n, N) float32 upper bounds of the chunks' q.k (exact q.k when mn is mx)."""
    qc = qc.float()
    if mn is mx:
        return torch.matmul(qc, mx.float().transpose(-1, -2))
    return (torch.matmul(qc.clamp(min=0), mx.float().transpose(-1, -2))
            + torch.matmul(qc.clamp(max=0), mn.float().transpose(-1, -2)))


def approx_scores_ref(q: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, chan: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, D); mn, mx (B, H_kv, N, C) sketch bounds at channels chan (B, H_kv, C)
    -> (B, H_kv, N) float32: for each chunk, the max over the KV head's query heads of its score."""
    B, H, _, D = q.shape
    H_kv = chan.shape[1]
    qg = q.reshape(B, H_kv, H // H_kv, D)  # (B, H_kv, n_rep, D)
    qc = qg.gather(-1, chan[:, :, None, :].expand(-1, -1, H // H_kv, -1))  # (B, H_kv, n_rep, C)
    return sketch_scores(qc, mn, mx).amax(dim=2)


@triton.jit
def _approx_scores_kernel(q_ptr, mn_ptr, mx_ptr, ch_ptr, out_ptr, N, H_KV,
                          s_qb, s_qh, s_sb, s_sh, s_sm, s_cb, s_ch, s_ob, s_oh,
                          N_REP: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, BOUNDS: tl.constexpr):
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H_KV, pid_bh % H_KV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, C)
    mask_m = offs_m < N
    chan = tl.load(ch_ptr + b * s_cb + h * s_ch + offs_c)  # (C,) channel ids of this KV head
    sk = b * s_sb + h * s_sh + offs_m[:, None] * s_sm + offs_c[None, :]
    mx = tl.load(mx_ptr + sk, mask=mask_m[:, None], other=0.0).to(tl.float32)  # (BLOCK_M, C)
    if BOUNDS:  # chunks of several tokens: min and max per channel
        mn = tl.load(mn_ptr + sk, mask=mask_m[:, None], other=0.0).to(tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for r in range(N_REP):  # the query heads that share this KV head
        qc = tl.load(q_ptr + b * s_qb + (h * N_REP + r) * s_qh + chan).to(tl.float32)  # (C,)
        if BOUNDS:
            s = tl.sum(tl.maximum(mx * qc[None, :], mn * qc[None, :]), axis=1)
        else:
            s = tl.sum(mx * qc[None, :], axis=1)
        best = tl.maximum(best, s)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_m, best, mask=mask_m)


def approx_scores_triton(q: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, chan: torch.Tensor) -> torch.Tensor:
    B, H, _, D = q.shape
    _, H_kv, N, C = mx.shape
    if C & (C - 1):
        raise ValueError(f"the Triton approx_scores kernel needs a power-of-two channel count, got {C}")
    bounds = mn is not mx
    q = q.reshape(B, H, D).contiguous()
    mx = mx.contiguous()
    mn = mn.contiguous() if bounds else mx
    if mn.stride() != mx.stride():
        raise ValueError("approx_scores: mn and mx must have the same layout")
    chan = chan.contiguous()
    out = torch.empty(B, H_kv, N, device=q.device, dtype=torch.float32)
    BLOCK_M = 128
    grid = (B * H_kv, triton.cdiv(N, BLOCK_M))
    _approx_scores_kernel[grid](q, mn, mx, chan, out, N, H_kv, q.stride(0), q.stride(1),
                                mx.stride(0), mx.stride(1), mx.stride(2),
                                chan.stride(0), chan.stride(1), out.stride(0), out.stride(1),
                                N_REP=H // H_kv, C=C, BLOCK_M=BLOCK_M, BOUNDS=bounds)
    return out


def approx_scores(q, mn, mx, chan):
    if use_triton(q) and not (mx.shape[-1] & (mx.shape[-1] - 1)):
        return approx_scores_triton(q, mn, mx, chan)
    return approx_scores_ref(q, mn, mx, chan)


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (B, H_kv, M) -> (B, H_kv, k) indices of the k largest, sorted by position (so the
    device buffer stays in token order and set differences are a searchsorted away)."""
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
