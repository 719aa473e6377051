"""The Triton kernels of kernels/pack.py (whose docstring is the format they write and read): the
per-token and per-channel quantize + pack, and the unpack + dequantize. Bit for bit the torch
references there (tests/test_pack.py); the arguments are checked by pack.py's dispatch
(quantize_pack, unpack_dequant) and kernels/fp8.py's, not again here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ranges import N_CLIP, group_codes, ranges

_TILE = 4096  # elements per program tile: large enough to amortise launches, small enough for registers
# On a GPU, tiles that search ranges (clip, 8-bit ranges) keep candidates' error tiles live:
# compiled for sm_90 (tools/kernel_resources.py) the token kernel at 4096 elements spilled 21-36 KB
# per thread and took minutes to compile; at 512 neither kernel spills with triton 3.6 or 3.9 (the
# channel kernel at 1024 did with 3.6).
_TILE_SEARCH = 512


# Tiles are 3-D (rows, bytes, PER): element d = byte * PER + lane, so packing a byte is a sum over
# the last axis of code << (lane * BITS) (the bit fields are disjoint, so sum == or).

@triton.jit
def quantize_token_rows(x, sup, ok, codes_ptr, scale_ptr, mn_ptr, x_ptr,
                        D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                        LEVELS: tl.constexpr, CLIP: tl.constexpr, N_CLIP: tl.constexpr, FP8: tl.constexpr,
                        BLOCK_B: tl.constexpr):
    """Quantize a tile of rows (tokens) per token and store them: x (BT, BB, PER) float32, the
    rows' elements (d = byte * PER + lane; padded columns are ignored), sup (BT,) their heads'
    superscales (FP8), ok (BT,) the rows to store. codes_ptr / scale_ptr / mn_ptr point at a
    (BT,) tensor of each row's first code byte / range (rows of D // PER bytes, D // GROUP
    ranges); x_ptr's element type is the stored ranges' dtype. Shared by the quantize kernel and
    QuantKV's decode append (kernels/quant_append.py)."""
    byte = tl.arange(0, BLOCK_B)  # (BB,) BLOCK_B = next_pow2(D / PER)
    lane = tl.arange(0, PER)  # (PER,)
    col = byte[None, :, None] * PER + lane[None, None, :]  # (1, BB, PER) element index d
    gid = col // GROUP  # padded columns get gid >= D // GROUP and join no group
    mn_e = tl.zeros(x.shape, tl.float32)  # per-element low end / step for the codes
    sc_e = tl.zeros(x.shape, tl.float32)
    for g in tl.static_range(D // GROUP):
        sel = gid == g  # (1, BB, PER)
        g_mn = tl.min(tl.min(tl.where(sel, x, float("inf")), axis=2), axis=1)  # (BT,)
        g_mx = tl.max(tl.max(tl.where(sel, x, float("-inf")), axis=2), axis=1)
        st_sc, st_mn, g_sc, g_lo = ranges(x, sel, g_mn, g_mx, sup, x_ptr, LEVELS, CLIP,
                                           N_CLIP, FP8, True)
        tl.store(scale_ptr + g, st_sc, mask=ok)
        tl.store(mn_ptr + g, st_mn, mask=ok)
        sc_e = tl.where(sel, g_sc[:, None, None], sc_e)  # codes come from the stored ranges
        mn_e = tl.where(sel, g_lo[:, None, None], mn_e)
    q = group_codes(x, mn_e, sc_e, LEVELS)
    packed = tl.sum(q << (lane[None, None, :] * BITS), axis=2)  # (BT, BB)
    tl.store(codes_ptr[:, None] + byte[None, :], packed.to(tl.uint8), mask=ok[:, None] & (byte[None, :] < D // PER))


@triton.jit
def _quant_token_kernel(x_ptr, codes_ptr, scale_ptr, mn_ptr, sup_ptr, R, T,
                        D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                        LEVELS: tl.constexpr, CLIP: tl.constexpr, N_CLIP: tl.constexpr, FP8: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr):
    # one program: BLOCK_T rows (tokens) x the whole head_dim; groups run along D
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    col = tl.arange(0, BLOCK_B)[None, :, None] * PER + tl.arange(0, PER)[None, None, :]  # (1, BB, PER)
    r3 = rows[:, None, None]
    x = tl.load(x_ptr + r3 * D + col, mask=(r3 < R) & (col < D), other=0.0).to(tl.float32)  # (BT, BB, PER)
    if FP8:
        sup = tl.load(sup_ptr + rows // T, mask=rows < R, other=1.0)  # (BT,) the row's head's superscale
    else:
        sup = tl.zeros((BLOCK_T,), tl.float32)  # unused
    quantize_token_rows(x, sup, rows < R, codes_ptr + rows * (D // PER), scale_ptr + rows * (D // GROUP),
                        mn_ptr + rows * (D // GROUP), x_ptr, D, GROUP, BITS, PER, LEVELS, CLIP, N_CLIP, FP8,
                        BLOCK_B)


@triton.jit
def _quant_channel_kernel(x_ptr, codes_ptr, scale_ptr, mn_ptr, sup_ptr, T,
                          D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                          LEVELS: tl.constexpr, CLIP: tl.constexpr, N_CLIP: tl.constexpr, FP8: tl.constexpr,
                          BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr):
    # one program: one group of GROUP tokens x BLOCK_B bytes (BLOCK_B * PER channels);
    # min/max reduce over the token axis, one scale per channel
    gi = tl.program_id(0)
    tok = tl.arange(0, BLOCK_G)  # (BG,) BLOCK_G = next_pow2(GROUP)
    byte = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,)
    lane = tl.arange(0, PER)
    t3 = tok[:, None, None]
    col = byte[None, :, None] * PER + lane[None, None, :]  # (1, BB, PER) channel index
    row3 = gi * GROUP + t3
    mask = (t3 < GROUP) & (col < D)  # (BG, BB, PER)
    x = tl.load(x_ptr + row3 * D + col, mask=mask, other=0.0).to(tl.float32)
    # padded tokens must not join the min/max; padded channels are 0 and never stored
    mn = tl.min(tl.where(t3 < GROUP, x, float("inf")), axis=0)  # (BB, PER)
    mx = tl.max(tl.where(t3 < GROUP, x, float("-inf")), axis=0)
    # the group's head's superscale (groups never straddle two heads: T % GROUP == 0)
    sup = tl.zeros((BLOCK_B, PER), tl.float32)
    if FP8:
        sup += tl.load(sup_ptr + gi * GROUP // T)
    st_sc, st_mn, sc, lo = ranges(x, t3 < GROUP, mn, mx, sup, x_ptr, LEVELS, CLIP, N_CLIP,
                                   FP8, False)
    col2 = byte[:, None] * PER + lane[None, :]  # (BB, PER)
    tl.store(scale_ptr + gi * D + col2, st_sc, mask=col2 < D)
    tl.store(mn_ptr + gi * D + col2, st_mn, mask=col2 < D)
    q = group_codes(x, lo[None, :, :], sc[None, :, :], LEVELS)  # codes come from the stored ranges
    packed = tl.sum(q << (lane[None, None, :] * BITS), axis=2)  # (BG, BB)
    rows = gi * GROUP + tok[:, None]
    bmask = (tok[:, None] < GROUP) & (byte[None, :] < D // PER)
    tl.store(codes_ptr + rows * (D // PER) + byte[None, :], packed.to(tl.uint8), mask=bmask)


@triton.jit
def _unpack_kernel(codes_ptr, scale_ptr, mn_ptr, out_ptr, R,
                   D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                   LEVELS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr):
    # one program: BLOCK_T rows x the whole head_dim; scale/mn are gathered per element
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    byte = tl.arange(0, BLOCK_B)
    lane = tl.arange(0, PER)
    bmask = (rows[:, None] < R) & (byte[None, :] < D // PER)  # (BT, BB)
    packed = tl.load(codes_ptr + rows[:, None] * (D // PER) + byte[None, :], mask=bmask, other=0)
    q = (packed.to(tl.int32)[:, :, None] >> (lane[None, None, :] * BITS)) & LEVELS  # (BT, BB, PER)
    r3 = rows[:, None, None]
    col = byte[None, :, None] * PER + lane[None, None, :]  # (1, BB, PER)
    mask = (r3 < R) & (col < D)
    if PER_CHANNEL:
        sidx = (r3 // GROUP) * D + col  # rows of one group share a scale per channel
    else:
        sidx = r3 * (D // GROUP) + col // GROUP
    sc = tl.load(scale_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    mn = tl.load(mn_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    x = q.to(tl.float32) * sc + mn
    tl.store(out_ptr + r3 * D + col, x.to(out_ptr.dtype.element_ty), mask=mask)


def _rows_block(R: int, block_b: int, per: int, tile: int = _TILE) -> int:
    """Rows per program so a (rows, block_b, per) tile holds about `tile` elements."""
    return max(1, min(triton.next_power_of_2(max(R, 1)), tile // (block_b * per)))


def quantize_pack_triton(x: torch.Tensor, bits: int, group: int, per_channel: bool, clip: bool = False,
                         sup: torch.Tensor | None = None):
    """Same contract as quantize_pack_ref; with `sup` (x's leading dims, float32 superscales) the
    ranges are 8-bit, as kernels/fp8.quantize_pack_fp8_ref returns them, in the same kernel."""
    per = 8 // bits
    *lead, T, D = x.shape
    # Leading dims (B, H_kv) fold into rows; per-channel groups never straddle two sequences
    # because T % group == 0. .contiguous() copies only when x is a strided view.
    x2 = x.contiguous().view(-1, D)  # (R, D)
    R = x2.shape[0]
    fp8 = sup is not None
    if fp8 and (tuple(sup.shape) != tuple(lead) or sup.dtype != torch.float32):
        raise ValueError(f"sup must be float32 of shape {tuple(lead)}, got {sup.dtype} {tuple(sup.shape)}")
    sup = sup.contiguous() if fp8 else x2  # without FP8 the kernels never read this pointer
    codes = torch.empty(R, D // per, dtype=torch.uint8, device=x.device)
    s_shape = (R // group, D) if per_channel else (R, D // group)
    scale = torch.empty(s_shape, dtype=torch.uint8 if fp8 else x.dtype, device=x.device)
    mn = torch.empty_like(scale)
    block_b = triton.next_power_of_2(D // per)
    # enable_fp_fusion=False below: no FMA contraction, so the float32 math rounds like the reference
    common = dict(D=D, GROUP=group, BITS=bits, PER=per, LEVELS=(1 << bits) - 1, CLIP=clip, N_CLIP=N_CLIP,
                  FP8=fp8, enable_fp_fusion=False)
    # Smaller tiles for range searches on a GPU (see _TILE_SEARCH); the interpreter keeps whole
    # tiles, as there launches are what is slow (tests/test_compile.py compiles the GPU's sizes).
    tile = _TILE_SEARCH if x.is_cuda and (clip or fp8) else _TILE
    if R > 0 and per_channel:
        block_g = triton.next_power_of_2(group)
        bb = max(1, min(block_b, tile // (block_g * per)))
        grid = (R // group, triton.cdiv(D // per, bb))
        _quant_channel_kernel[grid](x2, codes, scale, mn, sup, T, **common, BLOCK_G=block_g, BLOCK_B=bb)
    elif R > 0:
        bt = _rows_block(R, block_b, per, tile)
        if x.is_cuda and R <= 256:  # a decode step packs one row per (sequence, KV head), e.g. 8:
            bt = 1  # one program (SM) each, as each row runs up to 22 candidate ranges per group
        _quant_token_kernel[(triton.cdiv(R, bt),)](x2, codes, scale, mn, sup, R, T, **common, BLOCK_T=bt,
                                                   BLOCK_B=block_b)
    s_out = (*lead, T // group, D) if per_channel else (*lead, T, D // group)
    return codes.view(*lead, T, D // per), scale.view(s_out), mn.view(s_out)


def unpack_dequant_triton(codes, scale, mn, bits: int, group: int, per_channel: bool,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same contract as unpack_dequant_ref."""
    per = 8 // bits
    *lead, T, nb = codes.shape
    D = nb * per
    # .contiguous(): the kernel indexes flat rows; copies only for strided views
    c2 = codes.contiguous().view(-1, nb)  # (R, D/per)
    s2, m2 = scale.contiguous().view(-1, scale.shape[-1]), mn.contiguous().view(-1, mn.shape[-1])
    R = c2.shape[0]
    out = torch.empty(R, D, dtype=dtype or scale.dtype, device=codes.device)
    if R > 0:
        block_b = triton.next_power_of_2(nb)
        bt = _rows_block(R, block_b, per)
        # no FMA contraction, so code * scale + mn rounds like the two-op torch reference
        _unpack_kernel[(triton.cdiv(R, bt),)](c2, s2, m2, out, R, D=D, GROUP=group, BITS=bits, PER=per,
                                              LEVELS=(1 << bits) - 1, PER_CHANNEL=per_channel,
                                              BLOCK_T=bt, BLOCK_B=block_b, enable_fp_fusion=False)
    return out.view(*lead, T, D)
