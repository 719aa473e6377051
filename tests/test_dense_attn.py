"""kernels/dense_attn.py: flash-decoding over a buffer whose live rows end at a device-side
position, and the step's row write, against their torch references (interpreted here, compiled
on a GPU)."""
import pytest
import torch

from interpreted import check_compiled, check_interpreted

DENSE_CHECK = r"""
import os, torch
from kernels.dense_attn import dense_decode_attention_ref, dense_decode_attention_triton
DEV = os.environ.get("KERNEL_TEST_DEVICE", "cpu")
bad = 0
# (B, H, H_kv, D, buffer rows N, live rows n, offset, splits): a length of 1, splits past the live
# length (empty), GQA groups of 1..4, a position ahead of its row (offset < 0, as OffloadKV's)
for B, H, H_kv, D, N, n, off, splits in [(1, 4, 2, 32, 100, 37, 0, None), (2, 6, 3, 64, 300, 300, 0, 4),
                                         (1, 8, 8, 16, 80, 1, 0, 3), (1, 32, 8, 128, 200, 150, -90, 5)]:
    g = torch.Generator().manual_seed(N + n)
    q = torch.randn(B, H, 1, D, generator=g).to(DEV)
    k, v = torch.randn(B, H_kv, N, D, generator=g).to(DEV), torch.randn(B, H_kv, N, D, generator=g).to(DEV)
    pos = torch.tensor([n - 1 - off], device=DEV)  # rows [0, pos + off] = [0, n - 1] live
    ref = dense_decode_attention_ref(q, k, v, pos, off)
    tri = dense_decode_attention_triton(q, k, v, pos, off, n_splits=splits)
    if not torch.allclose(ref, tri, rtol=1e-4, atol=1e-5):
        bad += 1
        print("MISMATCH", B, H, H_kv, D, N, n, (ref - tri).abs().max().item())
print("cases failed:", bad)
"""

WRITE_CHECK = r"""
import os, torch
from kernels.dense_attn import write_row_ref, write_row_triton
DEV = os.environ.get("KERNEL_TEST_DEVICE", "cpu")
bad = 0
# new rows as views into a QKV projection's output, a store dtype other than theirs, an offset
for B, H_kv, D, N, pos, off, store in [(1, 2, 64, 40, 17, 0, torch.float32), (2, 3, 32, 50, 60, -20, torch.float32),
                                       (2, 2, 128, 9, 8, 0, torch.bfloat16)]:
    g = torch.Generator().manual_seed(N + pos)
    h = torch.randn(B, 1, 3 * H_kv * D, generator=g).to(DEV)  # [q | k | v] columns
    k_new, v_new = (h[..., a * H_kv * D:(a + 1) * H_kv * D].view(B, 1, H_kv, D).transpose(1, 2) for a in (1, 2))
    bufs = [torch.randn(B, H_kv, N, D, generator=g).to(DEV, store) for _ in range(2)]
    ref, tri = [t.clone() for t in bufs], [t.clone() for t in bufs]
    p = torch.tensor([pos], device=DEV)
    write_row_ref(*ref, k_new, v_new, p, off)
    write_row_triton(*tri, k_new, v_new, p, off)
    # bfloat16: the interpreter rounds float32 -> bfloat16 toward zero where torch rounds to nearest
    same = (lambda a, b: torch.allclose(a.float(), b.float(), rtol=1e-2)) if store == torch.bfloat16 else torch.equal
    if not (same(ref[0], tri[0]) and same(ref[1], tri[1])) or torch.equal(ref[0], bufs[0]):
        bad += 1
        print("MISMATCH", B, H_kv, D, N, pos, off, store)
print("cases failed:", bad)
"""


def test_dense_decode_triton_matches_reference():
    check_interpreted(DENSE_CHECK)


def test_write_row_triton_matches_reference():
    check_interpreted(WRITE_CHECK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dense_decode_compiled_on_cuda():
    check_compiled(DENSE_CHECK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_write_row_compiled_on_cuda():
    check_compiled(WRITE_CHECK)
