"""kernels/swiglu.py: the fused silu(gate) * up kernel against the torch reference (interpreted
here, compiled on a GPU): float32 and bfloat16, a width that is not a multiple of the block, a
strided view, several blocks per row, nothing written past the output."""
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
# nothing stored past a row's end: the last row's output in a buffer with a guard after it (a
# store one column too far lands in the next row, which its own program overwrites later in the
# interpreter's serial order; only the last row's shows, and on a GPU it would be a race)
from kernels.swiglu import _silu_mul_kernel
x = torch.randn(3, 2 * 100, generator=torch.Generator().manual_seed(2)).to(DEV)
buf = torch.full((3 * 100 + 64,), 7.0, device=DEV)
_silu_mul_kernel[(3, 2)](x, buf, 100, x.stride(0), BLOCK=64)
if not torch.equal(buf[300:], torch.full_like(buf[300:], 7.0)) or \
        not torch.allclose(buf[:300].view(3, 100), silu_mul_ref(x), rtol=1e-5, atol=1e-5):
    bad += 1
    print("MISMATCH guard", buf[300:302].tolist())
print("cases failed:", bad)
"""


def test_silu_mul_matches_reference_interpreted():
    check_interpreted(SWIGLU_CHECK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_silu_mul_compiled_on_cuda():
    check_compiled(SWIGLU_CHECK)
