"""kernels/norm.py: the fused RMSNorm kernel against the torch reference (interpreted here,
compiled on a GPU): float32 and bfloat16 rows, a width that is not a power of two, batched rows."""
import pytest
import torch

from interpreted import check_compiled, check_interpreted

NORM_CHECK = r"""
import os, torch
from kernels.norm import rms_norm_ref, rms_norm_triton
DEV = os.environ.get("KERNEL_TEST_DEVICE", "cpu")
bad = 0
for shape, dtype in [((1, 1, 64), torch.float32), ((2, 3, 576), torch.float32), ((4, 1, 4096), torch.bfloat16),
                     ((5, 96), torch.bfloat16)]:
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(DEV, dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(DEV, dtype)
    want, got = rms_norm_ref(x, w, 1e-5), rms_norm_triton(x, w, 1e-5)
    # float32: summation order and rsqrt; bfloat16: the rounding of those (one step) and, in the
    # interpreter, float32 -> bfloat16 rounded toward zero where torch rounds to nearest
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    close = torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
    if got.shape != want.shape or got.dtype != dtype or not close:
        bad += 1
        print("MISMATCH", shape, dtype, (got.float() - want.float()).abs().max().item())
print("cases failed:", bad)
"""


def test_rms_norm_matches_reference_interpreted():
    check_interpreted(NORM_CHECK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rms_norm_compiled_on_cuda():
    check_compiled(NORM_CHECK)
