"""Decode attention over a preallocated K/V buffer whose live length follows from a *device* tensor.

Why not SDPA: a CUDA graph replays fixed shapes, so a graphed decode step cannot slice the cache to
[:length] with a Python int that changes every step. This kernel reads the step's position from
device memory instead: the grid is sized for the whole buffer once (static), and each program
masks what lies past the live rows. Flash-decoding as in kernels/quant_attn.py: one program per
(batch, KV head) and split of the tokens serves all query heads of the GQA group, so each K/V row
is read once; the splits are merged by their running max and sum (kernels/splits.py).

Callers pass the position as the device tensor they already hold, and a host int `offset` from it
to the token's row (a policy that keeps fewer rows than positions: row = pos + offset), not a row
or a length computed by torch, which would cost each layer one more kernel, a node of the step's
CUDA graph. `write_row` stores the step's key and value into that row: one kernel where torch
takes two index_copy_ (and the addition).

The reference is `decode_attention` (below) over buffer[:, :, :pos + offset + 1]; it is also what
policies use for dense attention over a slice whose length the host knows (prefill-time scoring,
CPU steps).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import use_triton
from kernels.splits import attend_block, empty_partials, merge_splits_triton, store_split, tokens_per_split

TARGET_PROGRAMS = 512  # enough programs to fill a large GPU several times over
MIN_SPLIT_TOKENS = 256


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


def dense_decode_attention_ref(q, k, v, pos: torch.Tensor, offset: int = 0):
    """The reference: read the position on the host (a sync on a GPU) and attend over rows
    [0, pos + offset]. A cache stored in another dtype than q's (FullKV's `store`) is read as q's:
    only the live rows are converted."""
    n = int(pos.reshape(-1)[0]) + offset + 1
    return decode_attention(q, k[:, :, :n].to(q.dtype), v[:, :, :n].to(q.dtype))


def write_row_ref(k, v, k_new, v_new, pos: torch.Tensor, offset: int = 0) -> None:
    """k, v (B, H_kv, N, D) buffers; k_new, v_new (B, H_kv, 1, D); pos (1,) int64: in place, row
    pos + offset of every (sequence, KV head) gets the new key and value, in the buffers' dtype."""
    row = pos + offset
    k.index_copy_(2, row, k_new.to(k.dtype))
    v.index_copy_(2, row, v_new.to(v.dtype))


@triton.jit
def _write_row_kernel(K, V, KN, VN, POS, offset, N, H_kv, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, skn_b, skn_h,
                      svn_b, svn_h, D: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0).to(tl.int64)  # b * H_kv + h
    b, h = head // H_kv, head % H_kv
    row = tl.load(POS) + offset
    d = tl.arange(0, BLOCK_D)
    rows = row + 0 * d  # (BLOCK_D,): a scalar test & a tensor is int32 in the interpreter, not a mask
    ok = (d < D) & (rows >= 0) & (rows < N)  # a row past the buffer writes nothing (index_copy_ would raise)
    k = tl.load(KN + b * skn_b + h * skn_h + d, mask=ok)
    v = tl.load(VN + b * svn_b + h * svn_h + d, mask=ok)
    tl.store(K + b * sk_b + h * sk_h + row * sk_t + d, k.to(K.dtype.element_ty), mask=ok)
    tl.store(V + b * sv_b + h * sv_h + row * sv_t + d, v.to(V.dtype.element_ty), mask=ok)


def write_row_triton(k, v, k_new, v_new, pos: torch.Tensor, offset: int = 0) -> None:
    B, H_kv, _, D = k.shape
    assert k.stride(-1) == v.stride(-1) == k_new.stride(-1) == v_new.stride(-1) == 1
    _write_row_kernel[(B * H_kv,)](k, v, k_new, v_new, pos, offset, k.shape[2], H_kv,
                                   k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                   k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
                                   D=D, BLOCK_D=triton.next_power_of_2(D))


@triton.jit
def _dense_decode_kernel(Q, K, V, POS, offset, M_out, L_out, Acc_out, sm_scale, n_rep, H_kv, split_len,
                         sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                         D: tl.constexpr, NREP_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    b, hk = (pid_bh // H_kv).to(tl.int64), (pid_bh % H_kv).to(tl.int64)
    r = tl.arange(0, NREP_PAD)  # the group's query heads, padded so tl.dot has M >= 16
    d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + (hk * n_rep + r[:, None]) * sq_h + d[None, :], mask=r[:, None] < n_rep, other=0.0)
    length = (tl.load(POS) + offset + 1).to(tl.int32)
    m = tl.full([NREP_PAD], float("-inf"), dtype=tl.float32)  # running max of the scores
    l = tl.zeros([NREP_PAD], dtype=tl.float32)  # running sum of exp(score - m)  # noqa: E741
    acc = tl.zeros([NREP_PAD, D], dtype=tl.float32)
    lo = pid_s * split_len
    k_base, v_base = K + b * sk_b + hk * sk_h, V + b * sv_b + hk * sv_h
    # A fixed trip count (loop bounds from device memory trip up some Triton interpreters); blocks
    # past the live length load nothing (masked) and add nothing.
    for start in range(0, split_len, BLOCK_T):
        t = lo + start + tl.arange(0, BLOCK_T)  # int32 within the head: the wrapper checks it fits
        live = t < length
        # (D, BLOCK_T), in q's dtype: a cache stored in another (FullKV's store) is converted as it is read
        k = tl.load(k_base + t[None, :] * sk_t + d[:, None], mask=live[None, :], other=0.0).to(Q.dtype.element_ty)
        s = tl.dot(q, k, input_precision="ieee") * sm_scale  # (NREP_PAD, BLOCK_T)
        vt = tl.load(v_base + t[:, None] * sv_t + d[None, :], mask=live[:, None], other=0.0).to(Q.dtype.element_ty)
        m, l, acc = attend_block(m, l, acc, tl.where(live[None, :], s, float("-inf")), vt)  # noqa: E741
    store_split(M_out, L_out, Acc_out, m, l, acc, n_rep, NREP_PAD, D)


def dense_decode_attention_triton(q, k, v, pos: torch.Tensor, offset: int = 0, *, n_splits: int | None = None,
                                  block_t: int = 32):
    """q (B, H, 1, D); k, v (B, H_kv, N, D) buffers (in q's dtype or another), rows [0, pos + offset]
    live; pos a (1,) int device tensor -> (B, H, 1, D). Every launch parameter depends only on the
    shapes."""
    B, H, _, D = q.shape
    H_kv, N = k.shape[1], k.shape[2]
    n_rep = H // H_kv
    assert D >= 16 and D & (D - 1) == 0 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert max(k.stride(2), v.stride(2)) * N < 2 ** 31, "token offsets within a head are int32"
    if n_splits is None:
        n_splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, B * H_kv), triton.cdiv(N, MIN_SPLIT_TOKENS)))
    per_split = tokens_per_split(N, n_splits, block_t)
    n_splits = triton.cdiv(N, per_split)
    q = q.reshape(B, H, D).contiguous()
    m, l, acc = empty_partials(B * H_kv, n_splits, n_rep, D, q.device)  # noqa: E741
    _dense_decode_kernel[(B * H_kv, n_splits)](
        q, k, v, pos, offset, m, l, acc, 1.0 / math.sqrt(D), n_rep, H_kv, per_split,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        D=D, NREP_PAD=max(16, triton.next_power_of_2(n_rep)), BLOCK_T=block_t, num_warps=4)
    return merge_splits_triton(m, l, acc, q.dtype).reshape(B, H, 1, D)


def runs_triton(t: torch.Tensor, head_dim: int) -> bool:
    """Whether decode attention over tensors like t runs the Triton kernel (which reads the length
    on the device) rather than the reference (which reads it on the host)."""
    return use_triton(t) and head_dim >= 16 and not head_dim & (head_dim - 1)


def dense_decode_attention(q, k, v, pos: torch.Tensor, offset: int = 0):
    """Attention of q over rows [0, pos + offset] of the buffers k, v: the kernel on a GPU, else the
    reference."""
    if runs_triton(q, q.shape[-1]):
        return dense_decode_attention_triton(q, k, v, pos, offset)
    return dense_decode_attention_ref(q, k, v, pos, offset)


def write_row(k, v, k_new, v_new, pos: torch.Tensor, offset: int = 0) -> None:
    """write_row_ref's contract: the kernel on a GPU, else the reference."""
    if use_triton(k) and k.stride(-1) == v.stride(-1) == k_new.stride(-1) == v_new.stride(-1) == 1:
        write_row_triton(k, v, k_new, v_new, pos, offset)
    else:
        write_row_ref(k, v, k_new, v_new, pos, offset)
