"""The float8 e4m3 byte ("fn": no infinities, max 448) in which QuantKV stores 8-bit ranges
(kernels/fp8.py): encoding and decoding, in torch and inside Triton kernels, bit for bit alike.

A byte is s eeee mmm: sign, 4 exponent bits (bias 7), 3 mantissa bits. Exponent field 0 is
subnormal: m * 2^-9. Otherwise (1 + m/8) * 2^(e-7) = (8 + m) * 2^(e-10). 0x7f / 0xff are NaN and
never written (values are saturated at +-448 = 0x7e first). Bytes of one sign are ordered by
magnitude, which is what makes "one byte up/down" a +-1 on the byte.

Values here are in units of a per-head float32 superscale S (kernels/fp8.py): a range t is stored as
the byte of t / S and read back as e4m3(byte) * S, one float32 multiply on every side.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0


def _units(t: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
    """Ranges t (B, H, n, m) in e4m3 units of S (B, H), saturated at +-448 (float32)."""
    return (t.float() / sup[..., None, None]).clamp(-E4M3_MAX, E4M3_MAX)


def encode(t: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
    """Ranges t (B, H, n, m) float -> uint8 e4m3 bytes of t / S, rounded to nearest (even)."""
    return _units(t, sup).to(torch.float8_e4m3fn).view(torch.uint8)


def neighbours(t: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
    """(3, *t.shape) uint8: the bytes of t / S rounded to nearest, then down, then up (one rounding)."""
    y = _units(t, sup)
    b = y.to(torch.float8_e4m3fn)  # round to nearest even
    f, b = b.float(), b.view(torch.uint8).to(torch.int16)
    # One byte further: "up" is +1 for a positive byte and -1 for a negative one (RNE never lands
    # on the wrong side of zero; a tiny negative value rounds to -0, byte 0x80).
    up = torch.where(b < 128, 1, -1).to(torch.int16)
    return torch.stack([b, b - (f > y) * up, b + (f < y) * up]).to(torch.uint8)


def decode(b: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bytes (..., B, H, n, m) -> float32 ranges: e4m3(b) * S. The bytes index a table
    of all 256 values (torch's own float8_e4m3fn conversion, so the same floats): on CPU, converting
    each byte through float8 is the slower way. A 2-bit decode step at 4k tokens (SmolLM2 shapes,
    2 cores) widens four range tensors per layer: 272 us that way, 211 us through the table."""
    table = torch.arange(256, dtype=torch.uint8, device=b.device).view(torch.float8_e4m3fn).float()
    return torch.take(table, b.long()) * sup[..., None, None]


# ----------------------------------------------------------------------------- Triton

@triton.jit
def _pow2(e):
    """int32 e in [-126, 127] -> 2^e as float32, built from its bits (exact, unlike exp2)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_to_f32(byte):
    """uint8 e4m3 bytes -> float32, exact (module docstring)."""
    b = byte.to(tl.int32)
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    mag = tl.where(e == 0, m * 0.001953125, (8.0 + m) * _pow2(e - 10))  # subnormal: m * 2^-9
    return tl.where((b & 128) != 0, -mag, mag)


@triton.jit
def _rne(z):
    """Non-negative float32 z < 2^24 rounded to the nearest integer, ties to even (as float32).
    Written out because Triton has no portable rint; every step is exact."""
    f = tl.floor(z)
    r = z - f
    odd = (f.to(tl.int32) & 1) == 1
    return f + tl.where((r > 0.5) | ((r == 0.5) & odd), 1.0, 0.0)


@triton.jit
def f32_to_e4m3(y):
    """float32 y in [-448, 448] -> int32 e4m3 byte (0..255), rounded to nearest even, as torch's
    float8_e4m3fn conversion. The step at |y| is 2^(e - 3) for its binary exponent e, and 2^-9 below
    2^-6 (subnormals), so with e' = max(e, -6): n = rne(|y| / 2^(e' - 3)) in 0..16 and the byte is
    ((e' + 7) << 3) + n - 8. E.g. y = 1.85: e' = 0, n = rne(14.8) = 15, byte 0x3f = 1.875; n = 16
    carries into the exponent by itself (1.97 -> 0x40 = 2.0); subnormals (e' = -6) come out as n."""
    bits = y.to(tl.int32, bitcast=True)
    a = tl.abs(y)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 255) - 127, -6)  # float32 zero/subnormals: -127
    n = _rne(a * _pow2(3 - e)).to(tl.int32)  # scaling by a power of two is exact
    return (((e + 7) << 3) + n - 8) | tl.where(bits < 0, 128, 0)  # sign bit kept: -0 is 0x80, as in torch


@triton.jit
def e4m3_toward(y, b, DIR: tl.constexpr):
    """The byte b = f32_to_e4m3(y) (DIR 0), or one byte further down (1) or up (2) unless b is
    already on that side of y: `neighbours` for one direction."""
    f = e4m3_to_f32(b)
    up = tl.where(b < 128, 1, -1)
    if DIR == 1:
        b = b - tl.where(f > y, up, 0)
    elif DIR == 2:
        b = b + tl.where(f < y, up, 0)
    return b
