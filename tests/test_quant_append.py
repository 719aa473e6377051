"""kernels/quant_append.py: QuantKV's decode-step write (the leaving value quantized into its row,
the new key and value into the windows) as one Triton kernel against the reference, bit for bit
over steps before, at and past the ring's first wrap (interpreted here, compiled on a GPU): 4-bit
float ranges, 2-bit and 1-bit 8-bit ranges with clipping, bfloat16 values, strided new rows (views
into a QKV projection's output), rotated keys and values or values only or neither, and a cache
too short to pack anything.

The reference is the torch one for float32 without clipping (where torch's and Triton's quantize
agree bit for bit), and otherwise its steps with the quantize kernel in them
(LAYERKV_KERNELS=triton): the fusion must change nothing. (The quantize kernel
itself against torch, with clipping's near-ties and half precision: tests/test_pack.py.)"""
import pytest
import torch

from interpreted import check_compiled, check_interpreted

APPEND_CHECK = r"""
import os, torch
from interpreted import shard_of
from kernels.fp8 import superscale
from kernels.quant_append import quant_append_ref, quant_append_triton
DEV = os.environ.get("KERNEL_TEST_DEVICE", "cpu")
bad = 0
B, H_kv, D, R = 2, 2, 64, 4
# A signed permutation stands in for the rotation where results are compared bit for bit: each
# output is one product, exact in any summation order; not symmetric, so a transposed use shows.
g0 = torch.Generator().manual_seed(0)
perm = torch.eye(D)[torch.randperm(D, generator=g0)] * (torch.randint(0, 2, (D, 1), generator=g0) * 2 - 1)
# A head_dim that is not a power of two (96: the kernel's blocks are 128 wide, its masks do the rest)
# is never rotated: such models decode attention in torch, but this write is the kernel's.
CASES = [(4, 64, False, False, torch.float32, 8, "kv", 64), (2, 32, False, True, torch.float32, 8, "v", 64),
         (1, 32, True, True, torch.bfloat16, 8, "kv", 64), (2, 32, True, False, torch.bfloat16, 8, "none", 64),
         (4, 64, False, False, torch.float32, 0, "none", 64), (2, 32, False, True, torch.float32, 8, "none", 96)]
# interpreted 8-bit range searches are slow: each case runs once (the float32 ones against torch)
runs = [("torch" if not c[2] and c[4] == torch.float32 else "triton", c) for c in CASES]
for mode, (bits, group, clip, fp8, dtype, n_rows, rotate, D) in shard_of(runs):
    os.environ["LAYERKV_KERNELS"] = mode  # which quantize the reference calls (kernels.use_triton)
    g = torch.Generator().manual_seed(bits * 100 + n_rows)
    ranges = torch.uint8 if fp8 else dtype
    sup = superscale(torch.randn(B, H_kv, 16, D, generator=g)).to(DEV) if fp8 else None
    rot = perm.to(DEV, dtype) if rotate != "none" else None
    bufs = [torch.zeros(B, H_kv, R, D, dtype=dtype), torch.zeros(B, H_kv, R, D, dtype=dtype),
            torch.zeros(B, H_kv, n_rows, D * bits // 8, dtype=torch.uint8),
            *(torch.zeros(B, H_kv, n_rows, D // group, dtype=ranges) for _ in range(2))]
    ref = [t.to(DEV) for t in bufs]
    tri = [t.clone() for t in ref]
    for pos in range(min(R + n_rows, 2 * R + 2)):  # before, at and past the first wrap
        h = (torch.randn(B, 1, 3 * H_kv * D, generator=g) * 2).to(DEV, dtype)  # [q | k | v] columns, as the model's
        k_new, v_new = (h[..., a * H_kv * D:(a + 1) * H_kv * D].view(B, 1, H_kv, D).transpose(1, 2) for a in (1, 2))
        p = torch.tensor([pos], device=DEV)
        quant_append_ref(p, k_new, v_new, *ref, bits, group, clip, sup, rot, rotate)
        quant_append_triton(p, k_new, v_new, *tri, bits, group, clip, sup, rot, rotate)
        diff = [n for n, u, v in zip(("k_res", "v_res", "codes", "scale", "mn"), ref, tri) if not torch.equal(u, v)]
        if diff:
            bad += 1
            print("MISMATCH", mode, bits, group, clip, fp8, dtype, n_rows, rotate, D, "pos", pos, diff)
            break
D = 64  # (each case above set its own)
# The real rotation (a Hadamard matrix, every output a sum of D products): the windows agree to
# float32 rounding (the kernel sums in its own order)
from engine.kv.quant import hadamard
k_res, v_res = (torch.zeros(B, H_kv, R, D, device=DEV) for _ in range(2))
ref, tri = [k_res, v_res.clone()], [k_res.clone(), v_res.clone()]
empty = [torch.zeros(B, H_kv, 0, n, device=DEV) for n in (D // 2, D // 64, D // 64)]
for pos in range(3):
    k_new, v_new = (torch.randn(B, H_kv, 1, D, generator=g0).to(DEV) for _ in range(2))
    p = torch.tensor([pos], device=DEV)
    quant_append_ref(p, k_new, v_new, *ref, *empty, 4, 64, False, None, hadamard(D).to(DEV), "kv")
    quant_append_triton(p, k_new, v_new, *tri, *empty, 4, 64, False, None, hadamard(D).to(DEV), "kv")
if not all(torch.allclose(u, v, rtol=1e-5, atol=1e-5) for u, v in zip(ref, tri)) or not ref[0].abs().sum():
    bad += 1
    print("MISMATCH hadamard", max((u - v).abs().max().item() for u, v in zip(ref, tri)))
print("cases failed:", bad)
"""


def test_quant_append_matches_reference_interpreted():
    check_interpreted(APPEND_CHECK, shards=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quant_append_compiled_on_cuda():
    check_compiled(APPEND_CHECK)
