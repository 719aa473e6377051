"""RMSNorm, as Llama and Hugging Face compute it: normalise in float32, round to the model dtype,
then scale by the weight in the model dtype.

    y = weight * (x / sqrt(mean(x^2) + eps)).to(dtype)

The torch version is eight small kernels (cast, square, mean, add, rsqrt, multiply, cast, scale);
a decode step runs it twice per layer (before attention and before the MLP), so at 32 layers that
is ~500 nodes of its CUDA graph, each a few microseconds however little it computes. The Triton
kernel is one program per row (a token's hidden vector, e.g. 4096 values for Llama-3.1-8B) doing
the same arithmetic in one pass. It may differ from the reference by an ulp of float32 in the
variance (summation order, a hardware rsqrt), which moves the rounded result by at most one step
of the model dtype, rarely.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., dim), weight (dim,) -> (..., dim) in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@triton.jit
def _rms_norm_kernel(X, W, OUT, n_cols, eps, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)  # float32, as the reference
    w = tl.load(W + cols, mask=ok, other=0.0)
    # Rounded to the model dtype, then scaled: in float32, where the product of two bfloat16 (or
    # float16) values is exact, so one rounding after it matches the model dtype's multiply.
    y = w.to(tl.float32) * y.to(w.dtype).to(tl.float32)
    tl.store(OUT + row * n_cols + cols, y.to(w.dtype), mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)  # (rows, dim); a copy only for a view whose rows are not evenly spaced
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(dim)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, dim, eps, x2.stride(0), BLOCK=block,
                                         num_warps=min(16, max(4, block // 1024)))
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton on CUDA tensors (kernels/__init__.py) when the weight is in x's dtype, as a model's
    is; the reference elsewhere."""
    fused = use_triton(x) and weight.dtype == x.dtype and x.shape[-1] <= 65536  # a row in registers: 16 warps
    return (rms_norm_triton if fused else rms_norm_ref)(x, weight, eps)
