"""8-bit quantization ranges: QuantKV's per-group scale and min stored as float8 e4m3 bytes.

Why: at 2 bits a group of G values costs 2G bits of codes plus its scale and min. In bfloat16
those are 32 bits, so group 64 costs 2.5 bits per value and group 32, which halves the attention
error's excess over group 16's, costs 3. Stored as two e4m3 bytes (16 bits), group 32 costs what
group 64 did. Measured on the default model (tools/quant_ablation.py, 2-bit, 2k pass-key prompts,
relative attention-output error): group 64 0.099 -> 0.100 with 8-bit ranges, group 32 0.080 ->
0.080, group 16 0.063 -> 0.061: the rounding is lost in the quantization noise.

Format: e4m3 ("fn": no infinities, max 448) holds 3 mantissa bits: a stored range is off by at most
1/16 of itself. Its exponent spans 2^-9 .. 448, so each (batch, KV head) has one float32
*superscale* S, and a byte b stands for e4m3(b) * S. S = the head's largest |x| at prefill / 32:
then a min is at most 32 and a 2-bit step at most 2 * 32 / 3 in e4m3 units, leaving ~7x headroom
below 448 for tokens decoded later (beyond it a range saturates). E.g. a head whose prompt values
reach 6.4 has S = 0.2; a group with min -1.3 and step 0.35 stores e4m3(-6.5) = -6.5 exactly and
e4m3(1.75) = 1.75, i.e. -1.3 and 0.35; a step of 0.37 (1.85 units) is stored as 1.875 units, 0.375.

Rounding (kernels/pack.py): each group keeps whichever of the 3 x 3 byte pairs around its float
range (scale and min each rounded down, to nearest, up) dequantizes it with the smallest squared
error. Measured on Gaussian groups with uneven channels (group 32, MSE vs float ranges): rounding
both to nearest costs 0-7% at 1-2 bits and 7-15% at 4 bits (a step 1/16 short leaves the top of a
16-level range a whole step short); rounding outward (covering min/max) 17-24%; the best of the 9
pairs 0.83-0.97 (min/max ranges: a small free clip search) and 0.95-1.03 (clipped ranges).

Decoding is exact in every path: the torch side reads the bytes as torch.float8_e4m3fn, the Triton
side (`e4m3_to_f32`) builds the same value from the bits, and both then multiply by S once in
float32, so kernels and references agree bit for bit on the ranges.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
SUPER_DIV = 32.0  # S = largest |x| / SUPER_DIV (module docstring)


def superscale(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) -> S (B, H) float32: the head's largest |x| / SUPER_DIV (never 0)."""
    return (x.abs().amax(dim=(2, 3)).float() / SUPER_DIV).clamp_min(torch.finfo(torch.float32).tiny)


def encode(t: torch.Tensor, sup: torch.Tensor, direction: int = 0) -> torch.Tensor:
    """Ranges t (B, H, ...) float -> uint8 e4m3 bytes of t / S, saturating at +-448: the nearest
    value (direction 0), or the nearest at or above (+1) / at or below (-1) it."""
    s = sup.reshape(*sup.shape, *[1] * (t.dim() - sup.dim()))
    y = (t.float() / s).clamp(-E4M3_MAX, E4M3_MAX)
    b = y.to(torch.float8_e4m3fn)  # round to nearest even
    if direction == 0:
        return b.view(torch.uint8)
    wrong = b.float() < y if direction > 0 else b.float() > y
    # One byte further: the bytes of each sign are ordered by magnitude, so "up" is +1 for a
    # positive value and -1 for a negative one (RNE never lands on the wrong side of zero).
    positive = b.view(torch.uint8) < 128
    step = torch.where(positive == (direction > 0), 1, -1).to(torch.int16)
    return (b.view(torch.uint8).to(torch.int16) + wrong * step).to(torch.uint8)


def decode(b: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bytes (B, H, ...) -> float32 ranges: e4m3(b) * S."""
    s = sup.reshape(*sup.shape, *[1] * (b.dim() - sup.dim()))
    return b.view(torch.float8_e4m3fn).float() * s


@triton.jit
def e4m3_to_f32(byte):
    """uint8 e4m3 bytes -> float32, exact: sign, 4 exponent bits (bias 7), 3 mantissa bits;
    exponent 0 is subnormal (m * 2^-9). 2^(e - 10) is built from its float32 bits, not exp2."""
    b = byte.to(tl.int32)
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    pow2 = ((e + 117) << 23).to(tl.float32, bitcast=True)  # 2^(e - 10): biased exponent e - 10 + 127
    mag = tl.where(e == 0, m * 0.001953125, (8.0 + m) * pow2)  # (1 + m/8) * 2^(e-7) = (8 + m) * 2^(e-10)
    return tl.where((b & 128) != 0, -mag, mag)
