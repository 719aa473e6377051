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
The Triton kernels, bit for bit the references here: kernels/pack_triton.py.
"""
from __future__ import annotations

import torch

from kernels import use_triton
from kernels.pack_triton import quantize_pack_triton, unpack_dequant_triton
from kernels.ranges import clip_range, quantize_codes, step_of

_BITS = (1, 2, 4)


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


# ----------------------------------------------------------------------------- dispatch

def quantize_pack(x: torch.Tensor, bits: int, group: int, per_channel: bool, clip: bool = False):
    """x (..., T, D) float -> (codes uint8 (..., T, D*bits//8), scale, mn) — scale/mn
    (..., T, D//group) per-token or (..., T//group, D) per-channel, dtype x.dtype; clip: ranges
    chosen by squared error (module docstring). 8-bit ranges: kernels/fp8.py."""
    if not use_triton(x):
        return quantize_pack_ref(x, bits, group, per_channel, clip)  # which checks its arguments
    _check_quant(x, bits, group, per_channel)  # the kernels' wrappers do not
    return quantize_pack_triton(x, bits, group, per_channel, clip)


def unpack_dequant(codes, scale, mn, bits: int, group: int, per_channel: bool,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_pack: (..., T, D) in `dtype` (default scale.dtype)."""
    if not use_triton(codes):
        return unpack_dequant_ref(codes, scale, mn, bits, group, per_channel, dtype)  # which checks
    _check_unpack(codes, scale, mn, bits, group, per_channel)  # the kernels' wrapper does not
    return unpack_dequant_triton(codes, scale, mn, bits, group, per_channel, dtype)
