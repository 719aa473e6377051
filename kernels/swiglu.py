"""SwiGLU's gating, the middle of Llama's MLP: silu(gate) * up, from the fused gate/up projection's
output (engine/model.py's Block keeps W_gate and W_up as one matrix, columns [gate | up]).

In torch that is three kernels' worth of graph nodes per layer (the split is a view; silu; the
multiply), each a few microseconds of a CUDA-graph replay however little it computes. The Triton
kernel reads both halves and writes the product in one pass. It rounds where torch rounds: silu is
computed in float32 and rounded to the model dtype, then multiplied by `up` in float32 (exact for
two bfloat16 or float16 values) and rounded once more, so the two agree up to the last bit of
float32's exp (a hardware exp2 here, expf in torch), which moves a rounded result by one step of
the model dtype, rarely.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import use_triton


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2F), columns [gate | up] -> silu(gate) * up, (..., F) in gate_up's dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(GU, OUT, n_cols, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    base = GU + row * stride_row
    g = tl.load(base + cols, mask=ok, other=0.0)
    u = tl.load(base + n_cols + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # silu, rounded to the model dtype as torch's is
    tl.store(OUT + row * n_cols + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


def silu_mul_triton(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    two_f = gate_up.shape[-1]
    gu = gate_up.reshape(-1, two_f)  # (rows, 2F)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    n = two_f // 2
    out = torch.empty(gu.shape[0], n, device=gate_up.device, dtype=gate_up.dtype)
    if gu.shape[0] and n:
        _silu_mul_kernel[(gu.shape[0], triton.cdiv(n, block))](gu, out, n, gu.stride(0), BLOCK=block,
                                                               num_warps=4)
    return out.view(*gate_up.shape[:-1], n)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton on CUDA tensors (kernels/__init__.py), the reference elsewhere."""
    fused = use_triton(gate_up) and gate_up.shape[-1] % 2 == 0
    return (silu_mul_triton if fused else silu_mul_ref)(gate_up)
