"""kernels/splits.py: merging flash-decoding splits, the Triton kernel against the torch reference
(interpreted here, compiled on a GPU), with empty splits (m = -inf), split and head counts that are
not powers of two, and enough splits that a program holds fewer channels."""
import pytest
import torch

from interpreted import check_compiled, check_interpreted

MERGE_CHECK = r"""
import os, torch
from kernels.splits import merge_splits_ref, merge_splits_triton
DEV = os.environ.get("KERNEL_TEST_DEVICE", "cpu")
bad = 0
for BH, n_splits, n_rep, D, dtype in [(2, 1, 4, 64, torch.float32), (3, 7, 3, 128, torch.float32),
                                      (1, 50, 4, 128, torch.bfloat16), (2, 300, 1, 32, torch.float32)]:
    g = torch.Generator().manual_seed(n_splits)
    m = torch.randn(BH, n_splits, n_rep, generator=g) * 4
    l = torch.rand(BH, n_splits, n_rep, generator=g) + 0.5
    acc = torch.randn(BH, n_splits, n_rep, D, generator=g)
    if n_splits > 2:  # splits past the live length: no token, m = -inf, nothing summed
        m[:, -2:], l[:, -2:], acc[:, -2:] = float("-inf"), 0.0, 0.0
    m, l, acc = m.to(DEV), l.to(DEV), acc.to(DEV)
    want, got = merge_splits_ref(m, l, acc, dtype), merge_splits_triton(m, l, acc, dtype)
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    if got.shape != want.shape or got.dtype != dtype or not err < (1e-2 if dtype == torch.bfloat16 else 1e-5):
        bad += 1
        print("MISMATCH", BH, n_splits, n_rep, D, dtype, err)
print("cases failed:", bad)
"""


def test_merge_matches_reference_interpreted():
    check_interpreted(MERGE_CHECK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_merge_compiled_on_cuda():
    check_compiled(MERGE_CHECK)
