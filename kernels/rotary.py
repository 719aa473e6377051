"""RoPE applied in place to the query and key heads of the fused QKV projection's output.

apply_rope (the reference, below) is five small kernels per tensor (negate, concatenate, two
products, a sum), ten per layer for q and k: ~320 nodes of a decode step's CUDA graph at 32 layers. The
Triton kernel rotates every query and key head of a token in one program, all tokens in one launch,
in place in the projection's output h (B, T, (H + 2 H_kv) * D), whose q and k columns nothing else
reads.

Half-split layout (Hugging Face's, see engine/rope.py): with x = (x1, x2) and the angles repeated
over both halves,

    out1 = x1 cos - x2 sin        out2 = x2 cos + x1 sin

rounded as the reference rounds in the model dtype: each product, then the sum. A product of two
bfloat16 (or float16) values is exact in float32, and torch's reduced-precision add computes in
float32 and rounds once, so rounding each step from float32 reproduces the reference on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import use_triton


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: broadcastable to (B, 1, T, D) (engine/rope.rope_cos_sin). Rotates
    each (x[i], x[i + D/2]) pair."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_qk_ref(h: torch.Tensor, n_q: int, n_kv: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """h (B, T, (n_q + 2 n_kv) * D): RoPE applied in place to its n_q + n_kv query and key heads.
    cos, sin: broadcastable to (B, 1, T, D), as for apply_rope on (B, heads, T, D) (prefill: (T, D);
    decode: (B, 1, 1, D), one position per sequence)."""
    B, T, _ = h.shape
    x = h.view(B, T, -1, cos.shape[-1])[:, :, :n_q + n_kv].transpose(1, 2)  # (B, heads, T, D), a view of h
    x.copy_(apply_rope(x, cos, sin))


@triton.jit
def _rope_kernel(H, COS, SIN, T, n_heads, s_hb, s_ht, s_cb, s_ct, HALF: tl.constexpr, HEADS_PAD: tl.constexpr):
    """One program = one token: its n_heads (query + key) heads, rotated in place."""
    tok = tl.program_id(0)
    b, t = (tok // T).to(tl.int64), (tok % T).to(tl.int64)
    j, hd = tl.arange(0, HALF), tl.arange(0, HEADS_PAD)
    ok = (hd < n_heads)[:, None]
    first = H + b * s_hb + t * s_ht + hd[:, None] * (2 * HALF) + j[None, :]  # (HEADS_PAD, HALF) first halves
    x1 = tl.load(first, mask=ok, other=0.0)
    x2 = tl.load(first + HALF, mask=ok, other=0.0)
    c = tl.load(COS + b * s_cb + t * s_ct + j).to(tl.float32)[None, :]  # both halves rotate by the same angle
    s = tl.load(SIN + b * s_cb + t * s_ct + j).to(tl.float32)[None, :]
    dt = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    out1 = (x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)
    out2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    tl.store(first, out1.to(dt), mask=ok)
    tl.store(first + HALF, out2.to(dt), mask=ok)


def rope_qk_triton(h: torch.Tensor, n_q: int, n_kv: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Same contract as rope_qk_ref, for a contiguous h."""
    B, T, _ = h.shape
    D = cos.shape[-1]
    c, s = cos.expand(B, 1, T, D)[:, 0], sin.expand(B, 1, T, D)[:, 0]  # (B, T, D), stride 0 where shared
    assert h.is_contiguous() and c.stride(-1) == 1 and c.stride() == s.stride() and D % 2 == 0
    if B * T:
        _rope_kernel[(B * T,)](h, c, s, T, n_q + n_kv, h.stride(0), h.stride(1), c.stride(0), c.stride(1),
                               HALF=D // 2, HEADS_PAD=triton.next_power_of_2(n_q + n_kv))


def rope_qk(h: torch.Tensor, n_q: int, n_kv: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Triton on CUDA tensors (kernels/__init__.py) when h is contiguous and half a head a power of
    two >= 16 (every Llama: 64 or 128); the reference elsewhere."""
    half = cos.shape[-1] // 2
    fused = use_triton(h) and h.is_contiguous() and half >= 16 and not half & (half - 1)
    (rope_qk_triton if fused else rope_qk_ref)(h, n_q, n_kv, cos, sin)
