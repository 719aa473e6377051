"""kernels/swiglu.py: the fused silu(gate) * up kernel against the torch reference (interpreted
here, compiled on a GPU): float32 and bfloat16, a width that is not a multiple of the block, a
strided view, several blocks per row."""
import pytest
import torch

from interpreted import check_compiled, check_interpreted

SWIGLU_CHECK = r"""
import os, torch
from kernels.swiglu import silu_mul_ref, silu_mul_triton
DEV = os.environ.get("KERNEL_TEST_DEVICE", "cpu")
bad = 0
for shape, dtype, block in [((1, 1, 2 * 1536), torch.float32, 1024), ((3, 2 * 100), torch.float32, 64),
                            ((2, 1, 2 * 14336), torch.bfloat16, 1024), ((5, 2 * 96), torch.bfloat16, 32)]:
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 4).to(DEV, dtype)
    want, got = silu_mul_ref(x), silu_mul_triton(x, block=block)
    # float32: exp's last bit; bfloat16: that, rounded (one step) and, in the interpreter, float32 ->
    # bfloat16 rounded toward zero where torch rounds to nearest
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    close = torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
    if got.shape != want.shape or got.dtype != dtype or not close:
        bad += 1
        print("MISMATCH", shape, dtype, (got.float() - want.float()).abs().max().item())
# a view whose rows are not contiguous: every other row of a wider buffer
x = torch.randn(6, 2 * 80, generator=torch.Generator().manual_seed(1)).to(DEV)[::2]
if not torch.allclose(silu_mul_triton(x, block=32), silu_mul_ref(x), rtol=1e-5, atol=1e-5):
    bad += 1
    print("MISMATCH strided rows")
print("cases failed:", bad)
"""


def test_silu_mul_matches_reference_interpreted():
    check_interpreted(SWIGLU_CHECK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_silu_mul_compiled_on_cuda():
    check_compiled(SWIGLU_CHECK)
