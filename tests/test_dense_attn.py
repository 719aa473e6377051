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
# (B, H, H_kv, D, buffer rows N, live rows n, offset, splits, q dtype, cache dtype): a length of 1,
# splits past the live length (empty), GQA groups of 1..4, a position ahead of its row (offset < 0,
# as OffloadKV's), a cache stored in another dtype than q's (FullKV's store).
# bfloat16 compiled only: the interpreter's bfloat16 tl.dot is wrong (triton-lang/triton#11584)
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
cases = [(1, 4, 2, 32, 100, 37, 0, None, f32, f32), (2, 6, 3, 64, 300, 300, 0, 4, f32, f32),
         (1, 8, 8, 16, 80, 1, 0, 3, f32, f32), (1, 32, 8, 128, 200, 150, -90, 5, f32, f32),
         (1, 4, 2, 32, 100, 60, 0, 2, f32, f16)]
if DEV != "cpu":
    cases += [(2, 32, 8, 128, 3000, 2900, 0, None, bf16, bf16), (1, 32, 8, 128, 1000, 700, 0, None, bf16, f32)]
for B, H, H_kv, D, N, n, off, splits, dt, store in cases:
    g = torch.Generator().manual_seed(N + n)
    q = torch.randn(B, H, 1, D, generator=g).to(DEV, dt)
    k, v = (torch.randn(B, H_kv, N, D, generator=g).to(DEV, store) for _ in range(2))
    pos = torch.tensor([n - 1 - off], device=DEV)  # rows [0, pos + off] = [0, n - 1] live
    ref = dense_decode_attention_ref(q.float(), k.float(), v.float(), pos, off)
    tri = dense_decode_attention_triton(q, k, v, pos, off, n_splits=splits)
    if tri.dtype != dt or not torch.equal(dense_decode_attention_ref(q, k, v, pos, off).float(),
                                          dense_decode_attention_ref(q, k.to(dt), v.to(dt), pos, off).float()):
        bad += 1  # the output, and the reference's reading of the store, in q's dtype
        print("DTYPE", dt, store, tri.dtype)
    tri = tri.float()
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4  # bfloat16: the probabilities and output rounded
    if not torch.allclose(ref, tri, rtol=tol, atol=tol * 0.1):
        bad += 1
        print("MISMATCH", B, H, H_kv, D, N, n, (ref - tri).abs().max().item())
print("cases failed:", bad)
"""

WRITE_CHECK = r"""
import os, torch
from kernels.dense_attn import write_row_ref, write_row_triton
DEV = os.environ.get("KERNEL_TEST_DEVICE", "cpu")
bad = 0
# new rows as views into a QKV projection's output, a store dtype other than theirs, an offset;
# the first row (20 - 20) and the last (8 of 9)
for B, H_kv, D, N, pos, off, store in [(1, 2, 64, 40, 17, 0, torch.float32), (2, 3, 32, 50, 60, -20, torch.float32),
                                       (1, 1, 32, 5, 20, -20, torch.float32), (2, 2, 128, 9, 8, 0, torch.bfloat16)]:
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
# a row past the buffer (row N, just past it) or before it writes nothing, where index_copy_ would raise
for row in (N, -1):
    tri = [t.clone() for t in bufs]
    write_row_triton(*tri, k_new, v_new, torch.tensor([row], device=DEV), 0)
    if not (torch.equal(tri[0], bufs[0]) and torch.equal(tri[1], bufs[1])):
        bad += 1
        print("WROTE OUTSIDE", row)
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
