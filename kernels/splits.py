"""Flash-decoding's splits, the parts both decode-attention kernels share (kernels/dense_attn.py,
kernels/quant_attn_triton.py): how the tokens are cut into splits, one block of tokens folded into
a split's running sums (attend_block), a split's sums stored (store_split), and the merge.

Each split i of a (batch, KV head) leaves, per query head, its running max m_i, its sum
l_i = sum_t exp(s_t - m_i) and its weighted sum acc_i = sum_t exp(s_t - m_i) v_t over its tokens.
Rescaled to the global max M = max_i m_i, the splits add up to the softmax over all tokens:

    out = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i

E.g. two splits with m = (2, 5), l = (1.5, 1.0): weights exp(2 - 5) = 0.05 and 1, denominator
0.05 * 1.5 + 1.0 = 1.075. A split with no live token has m_i = -inf: weight 0.

In torch that is nine small kernels (max, subtract, exp, two products, two sums, a division, a
cast), each a node of the decode step's CUDA graph, per layer; the Triton kernel is one. Each
program takes one (batch, KV head) and a block of channels and holds all of its splits at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 8192  # elements of acc a program holds in the merge (splits x query heads x channels): 64 a thread


def tokens_per_split(n: int, n_splits: int, block: int) -> int:
    """Tokens per split when n tokens are cut into (at most) n_splits splits of whole blocks."""
    return triton.cdiv(triton.cdiv(n, n_splits), block) * block


def empty_partials(bh: int, n_splits: int, n_rep: int, D: int, device) -> tuple[torch.Tensor, ...]:
    """m, l (bh, n_splits, n_rep) and acc (bh, n_splits, n_rep, D) float32, for the kernels to fill."""
    part = dict(device=device, dtype=torch.float32)
    return (torch.empty(bh, n_splits, n_rep, **part), torch.empty(bh, n_splits, n_rep, **part),
            torch.empty(bh, n_splits, n_rep, D, **part))


@triton.jit
def attend_block(m, l, acc, s, v):  # noqa: E741
    """One block of flash-decoding: scores s (NREP_PAD, BLOCK_T), -inf where a token does not count,
    and its values v (BLOCK_T, D) folded into the running max m, sum l and weighted sum acc."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing live yet: avoid -inf - -inf
    alpha = tl.exp(m - m_ref)  # rescales what was summed under the old max (0 on the first block)
    p = tl.exp(s - m_ref[:, None])  # (NREP_PAD, BLOCK_T)
    # "ieee" keeps fp32 caches exact on GPUs (the default would be tf32); fp16/bf16 ignore it.
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _store_stats(M_out, L_out, m, l, n_rep, NREP_PAD: tl.constexpr):  # noqa: E741
    """m and l of this program's split (grid (batch x KV heads, splits)) -> its (B * H_kv, n_splits)
    row of the partials, which it returns; padding rows past n_rep are not stored."""
    row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    r = tl.arange(0, NREP_PAD)
    tl.store(M_out + row * n_rep + r, m, mask=r < n_rep)
    tl.store(L_out + row * n_rep + r, l, mask=r < n_rep)
    return row


@triton.jit
def store_split(M_out, L_out, Acc_out, m, l, acc, n_rep, NREP_PAD: tl.constexpr, D: tl.constexpr):  # noqa: E741
    """This program's split, unnormalised, into the partials: m = -inf for a split past the length
    (weight 0 in the merge)."""
    row = _store_stats(M_out, L_out, m, l, n_rep, NREP_PAD)
    r, d = tl.arange(0, NREP_PAD), tl.arange(0, D)
    tl.store(Acc_out + (row * n_rep + r[:, None]) * D + d[None, :], acc, mask=(r < n_rep)[:, None])


@triton.jit
def store_split_rotated(M_out, L_out, Acc_out, m, l, acc, ROT, n_rep,  # noqa: E741
                        NREP_PAD: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr):
    """store_split with acc R^T stored for acc, ROT pointing at R (D, D): a split over values stored
    rotated (v R, QuantKV) rotated back. Linear, so the merge of rotated-back splits is the
    rotated-back merge. The split's output acc / l is rounded to R's dtype for the product (tensor
    cores; the torch path rounds the merged output to the model dtype before its R^T the same way),
    normalised first so that float16 cannot overflow (acc sums up to a split's worth of values), and
    R^T is read CHUNK output columns at a time, a (D, CHUNK) slice in registers rather than all of R."""
    row = _store_stats(M_out, L_out, m, l, n_rep, NREP_PAD)
    r, e = tl.arange(0, NREP_PAD), tl.arange(0, D)
    scale = tl.where(l > 0, l, 1.0)[:, None]  # l = 0: an empty split (acc 0, weight 0 in the merge)
    a = (acc / scale).to(ROT.dtype.element_ty)
    for c in tl.static_range(0, D, CHUNK):
        j = c + tl.arange(0, CHUNK)
        rt = tl.load(ROT + j[None, :] * D + e[:, None])  # (D, CHUNK): R^T[e, j] = R[j, e]
        out = tl.dot(a, rt, input_precision="ieee") * scale  # (NREP_PAD, CHUNK), float32
        tl.store(Acc_out + (row * n_rep + r[:, None]) * D + j[None, :], out, mask=(r < n_rep)[:, None])


def merge_splits_ref(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor,  # noqa: E741
                     dtype: torch.dtype) -> torch.Tensor:
    """m, l (BH, n_splits, n_rep), acc (BH, n_splits, n_rep, D) float32 -> (BH, n_rep, D) in dtype."""
    w = torch.exp(m - m.amax(dim=1, keepdim=True))  # (BH, n_splits, n_rep)
    return ((acc * w[..., None]).sum(dim=1) / (l * w).sum(dim=1)[..., None]).to(dtype)


@triton.jit
def _merge_kernel(M, L, ACC, OUT, n_splits, n_rep,
                  D: tl.constexpr, SPLITS: tl.constexpr, NREP_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, pd = tl.program_id(0), tl.program_id(1)
    sp, r = tl.arange(0, SPLITS), tl.arange(0, NREP_PAD)
    dd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (sp[:, None] < n_splits) & (r[None, :] < n_rep)  # (SPLITS, NREP_PAD)
    row = (bh * n_splits + sp[:, None]) * n_rep + r[None, :]  # (SPLITS, NREP_PAD) into m, l
    m = tl.load(M + row, mask=ok, other=float("-inf"))
    l = tl.load(L + row, mask=ok, other=0.0)  # noqa: E741
    w = tl.where(ok, tl.exp(m - tl.max(m, axis=0)[None, :]), 0.0)  # (SPLITS, NREP_PAD)
    acc = tl.load(ACC + row[:, :, None] * D + dd[None, None, :], mask=ok[:, :, None], other=0.0)
    out = tl.sum(acc * w[:, :, None], axis=0) / tl.sum(l * w, axis=0)[:, None]  # (NREP_PAD, BLOCK_D)
    tl.store(OUT + (bh * n_rep + r[:, None]) * D + dd[None, :], out.to(OUT.dtype.element_ty),
             mask=r[:, None] < n_rep)


def merge_splits_triton(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor,  # noqa: E741
                        dtype: torch.dtype) -> torch.Tensor:
    """Same contract as merge_splits_ref; m, l, acc contiguous (as the kernels write them)."""
    BH, n_splits, n_rep, D = acc.shape
    assert m.is_contiguous() and l.is_contiguous() and acc.is_contiguous() and D & (D - 1) == 0
    out = torch.empty(BH, n_rep, D, device=acc.device, dtype=dtype)
    splits, nrep_pad = triton.next_power_of_2(n_splits), triton.next_power_of_2(n_rep)
    fit = TILE // (splits * nrep_pad)  # channels a program can hold: the largest power of two, 16 to D
    block_d = min(D, max(16, 1 << max(fit.bit_length() - 1, 0)))
    warps = min(16, max(4, splits * nrep_pad * block_d // 2048))  # <= 64 values a thread up to 512 splits
    _merge_kernel[(BH, D // block_d)](m, l, acc, out, n_splits, n_rep, D=D, SPLITS=splits, NREP_PAD=nrep_pad,
                                      BLOCK_D=block_d, num_warps=warps)
    return out
