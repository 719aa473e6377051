"""8-bit quantization ranges: QuantKV's per-group scale and min stored as float8 e4m3 bytes.

Why: at 2 bits a group of G values costs 2G bits of codes plus its scale and min. In bfloat16
those are 32 bits, so group 64 costs 2.5 bits per value and group 32 (2-bit attention error 0.080
against group 64's 0.099 on the default model) costs 3. Stored as two e4m3 bytes (16 bits), group
32 costs what group 64 did. Screened first with a prototype that rounded both to nearest
(tools/quant_ablation.py, 2-bit, 2k pass-key prompts, relative attention-output error): group 64
0.099 -> 0.100, group 32 0.080 -> 0.080, group 16 0.063 -> 0.061; end to end with this module's
rounding, docs/RESULTS.md ("8-bit ranges"): 2-bit KL 0.112 (group 64, bf16-sized float ranges) -> 0.051
(group 32, 8-bit: the same bytes).

Format: e4m3 ("fn": no infinities, max 448) holds 3 mantissa bits: a stored range is off by at most
1/16 of itself. Its exponent spans 2^-9 .. 448, so each (batch, KV head) has one float32
*superscale* S, and a byte b stands for e4m3(b) * S. S = the head's largest |x| at prefill / 32:
then a min is at most 32 and a 2-bit step at most 2 * 32 / 3 in e4m3 units, leaving ~7x headroom
below 448 for tokens decoded later (beyond it a range saturates). E.g. a head whose prompt values
reach 6.4 has S = 0.2; a group with min -1.3 and step 0.35 stores e4m3(-6.5) = -6.5 exactly and
e4m3(1.75) = 1.75, i.e. -1.3 and 0.35; a step of 0.37 (1.85 units) is stored as 1.875 units, 0.375.

Rounding (`_round_ranges`): each group keeps whichever of the 3 x 3 byte pairs around its float
range (scale and min each rounded down, to nearest, up) dequantizes it with the smallest squared
error. Measured on Gaussian groups with uneven channels (group 32, MSE vs float ranges): rounding
both to nearest costs 0-7% at 1-2 bits and 7-15% at 4 bits (a step 1/16 short leaves the top of a
16-level range a whole step short); rounding outward (covering min/max) 17-24%; the best of the 9
pairs 0.83-0.97 (min/max ranges: a small free clip search) and 0.95-1.03 (clipped ranges).

Where: on CUDA the Triton quantize kernels (kernels/pack_triton.py, through kernels/ranges.py) compute
a group's float range, round it and write the codes in one pass, so a decode step packs its value
row with one kernel; `_round_ranges` here is their torch reference. Both encode and decode bytes as
kernels/e4m3.py does, the same way bit for bit (torch's float8_e4m3fn and its Triton twin), and
multiply by S once in float32, so kernels and references agree on every byte except where two
candidate pairs' error sums tie to rounding (summed in another order, as with clipping:
kernels/ranges.py).
"""
from __future__ import annotations

import torch

from kernels import use_triton
from kernels.e4m3 import decode, neighbours
from kernels.pack import _check_quant, _expand, _pack, float_ranges_ref, unpack_dequant
from kernels.pack_triton import quantize_pack_triton
from kernels.ranges import quantize_codes

SUPER_DIV = 32.0  # S = largest |x| / SUPER_DIV (module docstring)
SLICE_VALUES = 1 << 16  # values (tokens x B x H x D) whose 9 range candidates _round_ranges weighs at once


def superscale(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) -> S (B, H) float32: the head's largest |x| / SUPER_DIV (never 0)."""
    return (x.abs().amax(dim=(2, 3)).float() / SUPER_DIV).clamp_min(torch.finfo(torch.float32).tiny)


def quantize_pack_fp8(x: torch.Tensor, bits: int, group: int, per_channel: bool, clip: bool, sup: torch.Tensor):
    """kernels/pack.quantize_pack with 8-bit ranges: x (B, H, T, D), sup (B, H) float32 ->
    (codes, scale bytes, mn bytes). Triton on CUDA tensors (one kernel: ranges, their rounding and
    the codes), the torch reference elsewhere (kernels/__init__.py)."""
    if not use_triton(x):
        return quantize_pack_fp8_ref(x, bits, group, per_channel, clip, sup)  # which checks its arguments
    _check_quant(x, bits, group, per_channel)  # the kernel's wrapper does not
    return quantize_pack_triton(x, bits, group, per_channel, clip, sup)


def quantize_pack_fp8_ref(x: torch.Tensor, bits: int, group: int, per_channel: bool, clip: bool,
                          sup: torch.Tensor):
    """The spec of quantize_pack_fp8: the float ranges of kernels/pack.quantize_pack_ref, rounded by
    squared error (module docstring), the codes computed from the rounded ones."""
    _check_quant(x, bits, group, per_channel)
    scale, mn = float_ranges_ref(x, bits, group, per_channel, clip)
    return _round_ranges(x, scale, mn, bits, group, per_channel, sup)


def unpack_dequant_fp8(codes, scale, mn, bits: int, group: int, per_channel: bool, sup: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_pack_fp8: the ranges widened (exactly), then kernels/pack.unpack_dequant."""
    return unpack_dequant(codes, decode(scale, sup), decode(mn, sup), bits, group, per_channel, dtype)


def _round_ranges(x, scale, mn, bits: int, group: int, per_channel: bool, sup: torch.Tensor):
    """(codes, scale bytes, mn bytes) for x (B, H, T, D) whose float ranges are (scale, mn): of the
    3 x 3 byte pairs around them (each rounded to nearest, down, up: `neighbours`) each group keeps
    the one that dequantizes it with the smallest squared error (the nearest pair on ties), and the
    codes are computed from it. The 9 candidates are one batch of tensor ops (a decode step packs
    a token with the same few kernels), in slices of T so a long prompt's candidates stay small:
    each of the ~7 (9, ..., rows, D) float32 tensors alive at once holds ~2 MiB (at Llama-3.1-8B's
    8 KV heads of 128, 64 tokens a slice; 2048 tokens a slice made them 72 MiB each, more than the
    rest of a prefill chunk's activations in float32)."""
    levels, T = (1 << bits) - 1, x.shape[-2]
    per_row = x[..., :1, :].numel()  # B * H * D values per token
    rows = group * max(1, SLICE_VALUES // (group * per_row))  # a whole number of groups along T either way
    out = []
    for t in range(0, T, rows):
        xc = x[..., t:t + rows, :].float()
        g = slice(t // group, (t + rows) // group) if per_channel else slice(t, t + rows)
        s8 = neighbours(scale[..., g, :], sup)[None].expand(3, 3, *scale[..., g, :].shape).flatten(0, 1)
        m8 = neighbours(mn[..., g, :], sup)[:, None].expand(3, 3, *mn[..., g, :].shape).flatten(0, 1)
        sf, mf = (_expand(decode(b, sup), group, per_channel) for b in (s8, m8))  # (9, B, H, rows, D)
        q = quantize_codes(xc, sf, mf, levels)
        e = (q * sf + mf - xc).square()
        err = e.unflatten(-2, (-1, group)).sum(-2) if per_channel else e.unflatten(-1, (-1, group)).sum(-1)
        best = err.argmin(0, keepdim=True)  # (1, B, H, n, m): the first minimum, candidate 0 = nearest
        codes = q.gather(0, _expand(best, group, per_channel).long())[0]
        out.append((_pack(codes, bits), s8.gather(0, best)[0], m8.gather(0, best)[0]))
    return tuple(torch.cat(parts, dim=-2) for parts in zip(*out))
