"""KIVI-style asymmetric quantization (min/max or clipped ranges) + bit packing for the quantized KV cache.

Format (the decode-attention kernel and the cache depend on it exactly):
  bits b in {1, 2, 4}, per = 8 // b codes per uint8, always packed along the last dim D:
    packed[..., j] = sum_i code[..., j*per + i] << (i*b)    (element d: byte d // per, bit (d % per) * b)
  per-token  (values): groups of `group` consecutive elements along D -> scale, mn (..., T, D // group)
  per-channel (keys):  groups of `group` consecutive tokens along T   -> scale, mn (..., T // group, D)
  mn = group min, scale = (max - min) / (2**b - 1) (with clip: the chosen range's low end and step),
  both computed in float32 and stored in x.dtype;
  codes are computed from the *stored* (cast) values so dequantization matches what is kept:
    code  = clamp(floor((x - mn) / scale + 0.5), 0, 2**b - 1), and 0 where scale == 0
    x_hat = code * scale + mn   (float32 math)
Rounding is floor(y + 0.5) rather than round-half-even because Triton has no portable rint; the
reference does exactly the same, so the Triton kernels match it bit for bit.

How a group's range is chosen (min/max, `clip=True`, 8-bit ranges) and its codes: kernels/ranges.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import use_triton
from kernels.ranges import N_CLIP, clip_range, group_codes, quantize_codes, ranges, step_of

_BITS = (1, 2, 4)
_TILE = 4096  # elements per program tile: large enough to amortise launches, small enough for registers
# On a GPU, tiles that search ranges (clip, 8-bit ranges) keep candidates' error tiles live:
# compiled for sm_90 (tools/kernel_resources.py) the token kernel at 4096 elements spilled 21-36 KB
# per thread and took minutes to compile; at 512 neither kernel spills with triton 3.6 or 3.9 (the
# channel kernel at 1024 did with 3.6).
_TILE_SEARCH = 512


def _check_quant(x: torch.Tensor, bits: int, group: int, per_channel: bool) -> int:
    """Validate quantize arguments; return codes per byte."""
    if bits not in _BITS:
        raise ValueError(f"bits must be one of {_BITS}, got {bits}")
    if x.dim() < 2:
        raise ValueError(f"x must be (..., T, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if group <= 0:
        raise ValueError(f"group must be positive, got {group}")
    T, D = x.shape[-2:]
    per = 8 // bits
    if D % per != 0:
        raise ValueError(f"head_dim {D} is not a multiple of {per} ({bits}-bit codes per byte)")
    if per_channel and T % group != 0:
        raise ValueError(f"per-channel: T={T} is not a multiple of group={group}")
    if not per_channel and D % group != 0:
        raise ValueError(f"per-token: head_dim {D} is not a multiple of group={group}")
    return per


def _check_unpack(codes, scale, mn, bits, group, per_channel) -> int:
    """Validate unpack arguments against the format above; return the head_dim D."""
    if bits not in _BITS:
        raise ValueError(f"bits must be one of {_BITS}, got {bits}")
    if codes.dtype != torch.uint8 or codes.dim() < 2:
        raise ValueError(f"codes must be uint8 (..., T, D*bits/8), got {codes.dtype} {tuple(codes.shape)}")
    if group <= 0:
        raise ValueError(f"group must be positive, got {group}")
    *lead, T, nb = codes.shape
    D = nb * (8 // bits)
    if per_channel:
        if T % group != 0:
            raise ValueError(f"per-channel: T={T} is not a multiple of group={group}")
        want = (*lead, T // group, D)
    else:
        if D % group != 0:
            raise ValueError(f"per-token: head_dim {D} is not a multiple of group={group}")
        want = (*lead, T, D // group)
    if tuple(scale.shape) != want or tuple(mn.shape) != want:
        raise ValueError(f"scale/mn must have shape {want}, got {tuple(scale.shape)} / {tuple(mn.shape)}")
    return D


# ----------------------------------------------------------------------------- reference (the spec)

def _expand(s: torch.Tensor, group: int, per_channel: bool) -> torch.Tensor:
    """Broadcast per-group scale/mn to one value per element of (..., T, D), in float32."""
    return s.float().repeat_interleave(group, dim=-2 if per_channel else -1)


def quantize_pack_ref(x: torch.Tensor, bits: int, group: int, per_channel: bool, clip: bool = False):
    """x (..., T, D) float -> (codes uint8 (..., T, D*bits//8), scale, mn); scale/mn are
    (..., T, D//group) per-token or (..., T//group, D) per-channel, dtype x.dtype. clip: choose each
    group's range by squared error instead of min/max (module docstring)."""
    _check_quant(x, bits, group, per_channel)
    scale, mn = float_ranges_ref(x, bits, group, per_channel, clip)
    levels = (1 << bits) - 1
    q = quantize_codes(x.float(), _expand(scale, group, per_channel), _expand(mn, group, per_channel), levels)
    return _pack(q, bits), scale, mn


def float_ranges_ref(x: torch.Tensor, bits: int, group: int, per_channel: bool, clip: bool):
    """The (scale, mn) of quantize_pack_ref alone, in x.dtype, without its codes (the 8-bit ranges'
    reference rounds these and makes its own codes: kernels/fp8.py)."""
    levels = (1 << bits) - 1
    xf = x.float()
    if per_channel:
        g = xf.unflatten(-2, (-1, group)).transpose(-1, -2)  # (..., T/G, D, G)
    else:
        g = xf.unflatten(-1, (-1, group))  # (..., T, D/G, G)
    if clip:
        scale, mn = clip_range(g.reshape(-1, group), levels, x.dtype)  # (groups,) each
        return scale.view(g.shape[:-1]), mn.view(g.shape[:-1])
    mn = g.amin(-1)  # (..., T/G, D) per-channel or (..., T, D/G) per-token
    return step_of(g.amax(-1) - mn, levels).to(x.dtype), mn.to(x.dtype)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """float codes (..., T, D) -> uint8 (..., T, D*bits//8), `per` codes to a byte along D."""
    per = 8 // bits
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits  # (per,)
    return (q.to(torch.int32).unflatten(-1, (-1, per)) << shifts).sum(-1).to(torch.uint8)  # (..., T, D/per)


def unpack_dequant_ref(codes, scale, mn, bits: int, group: int, per_channel: bool,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_pack_ref: (..., T, D) in `dtype` (default scale.dtype)."""
    _check_unpack(codes, scale, mn, bits, group, per_channel)
    per, levels = 8 // bits, (1 << bits) - 1
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits  # (per,)
    q = ((codes.to(torch.int32)[..., None] >> shifts) & levels).flatten(-2)  # (..., T, D)
    x = q.float() * _expand(scale, group, per_channel) + _expand(mn, group, per_channel)
    return x.to(dtype or scale.dtype)


# ----------------------------------------------------------------------------- Triton
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
    per = _check_quant(x, bits, group, per_channel)
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
    D = _check_unpack(codes, scale, mn, bits, group, per_channel)
    per = 8 // bits
    *lead, T, nb = codes.shape
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


# ----------------------------------------------------------------------------- dispatch

def quantize_pack(x: torch.Tensor, bits: int, group: int, per_channel: bool, clip: bool = False):
    """x (..., T, D) float -> (codes uint8 (..., T, D*bits//8), scale, mn) — scale/mn
    (..., T, D//group) per-token or (..., T//group, D) per-channel, dtype x.dtype; clip: ranges
    chosen by squared error (module docstring). 8-bit ranges: kernels/fp8.py."""
    fn = quantize_pack_triton if use_triton(x) else quantize_pack_ref
    return fn(x, bits, group, per_channel, clip)


def unpack_dequant(codes, scale, mn, bits: int, group: int, per_channel: bool,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_pack: (..., T, D) in `dtype` (default scale.dtype)."""
    fn = unpack_dequant_triton if use_triton(codes) else unpack_dequant_ref
    return fn(codes, scale, mn, bits, group, per_channel, dtype)
