"""QuantKV's decode-step write: the new token's key and value enter the full-precision windows, and
the value that leaves the ring is quantized into the packed store (engine/kv/quant.py explains
the layout: keys wait in a residual block packed R at a time between steps; values sit in a ring
of the last R tokens, token t in slot t % R, and each is quantized per token as it leaves).

At position pos (a device tensor: the same code runs in a CUDA graph), with slot = pos % R:
  1. the ring's slot still holds token pos - R (once pos >= R): quantize it into row pos - R of
     the value store. Before that the slot is unused, and row 0 gets a placeholder that the step
     at pos = R overwrites (no host branch: every step runs the same kernels);
  2. write k_new into the key block's slot and v_new into the ring's slot, each first rotated by
     the head_dim x head_dim matrix `rot` where `rotate` says ("kv": both, "v": values only;
     engine/kv/quant.py explains why QuantKV rotates).
Worked example, R = 128: at pos = 300, slot 44 holds token 172, which is packed into row 172;
then token 300's value takes slot 44 (and its key slot 44 of the block holding 256..383).

The torch reference is up to twelve small kernels (two rotations, the remainder, a row read, the
quantize kernel, a subtract and a clamp, five row writes), each a node of the step's CUDA graph
at every QuantKV layer; the Triton kernel is one program per (sequence, KV head) doing the same,
with the quantize kernel's own per-token code (kernels/pack_triton.quantize_token_rows), so its bytes
are the same. Its rotation sums each output channel's D products in float32 in its own order (a
chunk of 32 input channels at a time) and rounds once: from torch's matmul it may differ in the
last bit of the model dtype, rarely.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import use_triton
from kernels.fp8 import quantize_pack_fp8
from kernels.pack import quantize_pack
from kernels.pack_triton import quantize_token_rows
from kernels.ranges import N_CLIP


def quant_append_ref(pos, k_new, v_new, k_res, v_res, v_codes, v_scale, v_mn, bits: int, group: int,
                     clip: bool, v_sup: torch.Tensor | None = None, rot: torch.Tensor | None = None,
                     rotate: str = "none") -> None:
    """In place. pos (1,) int64; k_new, v_new (B, H_kv, 1, D); k_res, v_res (B, H_kv, R, D);
    v_codes (B, H_kv, N, D * bits // 8), v_scale / v_mn (B, H_kv, N, D // group) in the model
    dtype, or e4m3 bytes of the superscales v_sup (B, H_kv) float32. N = 0: nothing is packed.
    rot (D, D) in the model dtype, applied as row @ rot to the keys and values `rotate` names."""
    if rotate != "none":
        k_new, v_new = (k_new @ rot if rotate == "kv" else k_new), v_new @ rot
    slot = pos % v_res.shape[2]  # (1,)
    if v_codes.shape[2]:
        leaving = v_res.index_select(2, slot)  # (B, H_kv, 1, D)
        if v_sup is None:
            codes, scale, mn = quantize_pack(leaving, bits, group, False, clip)
        else:
            codes, scale, mn = quantize_pack_fp8(leaving, bits, group, False, clip, v_sup)
        row = (pos - v_res.shape[2]).clamp(min=0)
        v_codes.index_copy_(2, row, codes)
        v_scale.index_copy_(2, row, scale)
        v_mn.index_copy_(2, row, mn)
    k_res.index_copy_(2, slot, k_new)
    v_res.index_copy_(2, slot, v_new)


@triton.jit
def _rotated_row(X, ROT, D: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """(BLOCK_D,) float32: the row X (D,) times ROT (D, D), summed CHUNK input channels at a time
    (a (CHUNK, BLOCK_D) slice of ROT in registers, not all of it)."""
    d = tl.arange(0, BLOCK_D)
    out = tl.zeros((BLOCK_D,), tl.float32)
    for c in tl.static_range(0, D, CHUNK):
        e = c + tl.arange(0, CHUNK)
        x = tl.load(X + e, mask=e < D, other=0.0).to(tl.float32)  # (CHUNK,)
        r = tl.load(ROT + e[:, None] * D + d[None, :], mask=(e[:, None] < D) & (d[None, :] < D), other=0.0)
        out += tl.sum(x[:, None] * r.to(tl.float32), axis=0)
    return out


@triton.jit
def _quant_append_kernel(POS, K_NEW, V_NEW, K_RES, V_RES, V_CODES, V_SCALE, V_MN, SUP, ROT, H_kv, R, N,
                         skn_b, skn_h, svn_b, svn_h,
                         D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                         LEVELS: tl.constexpr, CLIP: tl.constexpr, N_CLIP: tl.constexpr, FP8: tl.constexpr,
                         PACK: tl.constexpr, ROT_K: tl.constexpr, ROT_V: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_B: tl.constexpr):
    head = tl.program_id(0).to(tl.int64)  # b * H_kv + h: one (sequence, KV head) per program
    b, h = head // H_kv, head % H_kv
    pos = tl.load(POS)
    res_row = head * R + pos % R  # the windows' slot, in rows of the (B, H_kv, R, D) buffers
    if PACK:
        # 1. the ring's leaving value, read before step 2 overwrites it (same program: in order)
        col = tl.arange(0, BLOCK_B)[None, :, None] * PER + tl.arange(0, PER)[None, None, :]  # (1, BB, PER)
        x = tl.load(V_RES + res_row * D + col, mask=col < D, other=0.0).to(tl.float32)  # (1, BB, PER)
        if FP8:
            sup = tl.load(SUP + head + tl.zeros((1,), tl.int64))  # (1,) this head's superscale
        else:
            sup = tl.zeros((1,), tl.float32)  # unused
        row = head * N + tl.maximum(pos - R, 0) + tl.zeros((1,), tl.int64)  # (1,) its store row
        quantize_token_rows(x, sup, row < (head + 1) * N, V_CODES + row * (D // PER), V_SCALE + row * (D // GROUP),
                            V_MN + row * (D // GROUP), V_RES, D, GROUP, BITS, PER, LEVELS, CLIP, N_CLIP, FP8,
                            BLOCK_B)
    # 2. the new token's key and value into the windows, rotated where asked. The barrier orders
    # step 1's reads of the ring slot before these writes across the program's threads.
    tl.debug_barrier()
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    kn, vn = K_NEW + b * skn_b + h * skn_h, V_NEW + b * svn_b + h * svn_h
    if ROT_K:
        k = _rotated_row(kn, ROT, D, BLOCK_D, 32)
    else:
        k = tl.load(kn + d, mask=ok)
    if ROT_V:
        v = _rotated_row(vn, ROT, D, BLOCK_D, 32)
    else:
        v = tl.load(vn + d, mask=ok)
    tl.store(K_RES + res_row * D + d, k.to(K_RES.dtype.element_ty), mask=ok)
    tl.store(V_RES + res_row * D + d, v.to(V_RES.dtype.element_ty), mask=ok)


def quant_append_triton(pos, k_new, v_new, k_res, v_res, v_codes, v_scale, v_mn, bits: int, group: int,
                        clip: bool, v_sup: torch.Tensor | None = None, rot: torch.Tensor | None = None,
                        rotate: str = "none") -> None:
    """Same contract as quant_append_ref: one launch, every parameter from the shapes."""
    B, H_kv, R, D = v_res.shape
    per = 8 // bits
    assert k_res.is_contiguous() and v_res.is_contiguous() and v_codes.is_contiguous()
    assert v_scale.is_contiguous() and v_mn.is_contiguous() and k_new.stride(-1) == 1 and v_new.stride(-1) == 1
    assert rotate == "none" or (rot.is_contiguous() and rot.shape == (D, D))
    assert v_sup is None or v_sup.is_contiguous(), "the kernel reads superscale b * H_kv + h"
    _quant_append_kernel[(B * H_kv,)](
        pos, k_new, v_new, k_res, v_res, v_codes, v_scale, v_mn, v_res if v_sup is None else v_sup,
        v_res if rotate == "none" else rot, H_kv, R, v_codes.shape[2],
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        D=D, GROUP=group, BITS=bits, PER=per, LEVELS=(1 << bits) - 1, CLIP=clip, N_CLIP=N_CLIP,
        FP8=v_sup is not None, PACK=v_codes.shape[2] > 0, ROT_K=rotate == "kv", ROT_V=rotate != "none",
        BLOCK_D=triton.next_power_of_2(D), BLOCK_B=triton.next_power_of_2(D // per),
        enable_fp_fusion=False)  # no contracted multiply-adds: rounds as the reference


def quant_append(pos, k_new, v_new, k_res, v_res, v_codes, v_scale, v_mn, bits: int, group: int,
                 clip: bool, v_sup: torch.Tensor | None = None, rot: torch.Tensor | None = None,
                 rotate: str = "none") -> None:
    """The Triton kernel on CUDA tensors (kernels/__init__.py), the torch reference elsewhere."""
    fn = quant_append_triton if use_triton(v_res) else quant_append_ref
    fn(pos, k_new, v_new, k_res, v_res, v_codes, v_scale, v_mn, bits, group, clip, v_sup, rot, rotate)
