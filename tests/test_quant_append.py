"""kernels/quant_append.py: QuantKV's decode-step write (the leaving value quantized into its row,
the new key and value into the windows) as one Triton kernel against the reference, bit for bit
over steps before, at and past the ring's first wrap (interpreted here, compiled on a GPU): 4-bit
float ranges, 2-bit and 1-bit 8-bit ranges with clipping, bfloat16 values, strided new rows (views
into a QKV projection's output), and a cache too short to pack anything.

The reference is the torch one for float32 without clipping (where torch's and Triton's quantize
agree bit for bit), and otherwise its steps with the quantize kernel in them
(LAYERKV_KERNELS=triton): the fusion must change nothing. (The quantize kernel
itself against torch, with clipping's near-ties and half precision: tests/test_pack.py.)"""
import pytest
import torch

from interpreted import check_compiled, check_interpreted

APPEND_CHECK = r"""
import os, torch
from kernels.fp8 import superscale
from kernels.quant_append import quant_append_ref, quant_append_triton
DEV = os.environ.get("KERNEL_TEST_DEVICE", "cpu")
bad = 0
B, H_kv, D, R = 2, 2, 64, 4
CASES = [(4, 64, False, False, torch.float32, 8), (2, 32, False, True, torch.float32, 8),
         (1, 32, True, True, torch.bfloat16, 8), (2, 32, True, False, torch.bfloat16, 8),
         (4, 64, False, False, torch.float32, 0)]
# interpreted 8-bit range searches are slow: each case runs once (the float32 ones against torch)
runs = [("torch" if not c[2] and c[4] == torch.float32 else "triton", c) for c in CASES]
for mode, (bits, group, clip, fp8, dtype, n_rows) in runs:
    os.environ["LAYERKV_KERNELS"] = mode  # which quantize the reference calls (kernels.use_triton)
    g = torch.Generator().manual_seed(bits * 100 + n_rows)
    ranges = torch.uint8 if fp8 else dtype
    sup = superscale(torch.randn(B, H_kv, 16, D, generator=g)).to(DEV) if fp8 else None
    bufs = [torch.zeros(B, H_kv, R, D, dtype=dtype), torch.zeros(B, H_kv, R, D, dtype=dtype),
            torch.zeros(B, H_kv, n_rows, D * bits // 8, dtype=torch.uint8),
            torch.zeros(B, H_kv, n_rows, D // group, dtype=ranges), torch.zeros(B, H_kv, n_rows, D // group, dtype=ranges)]
    ref = [t.to(DEV) for t in bufs]
    tri = [t.clone() for t in ref]
    for pos in range(min(R + n_rows, 2 * R + 2)):  # before, at and past the first wrap
        h = (torch.randn(B, 1, 3 * H_kv * D, generator=g) * 2).to(DEV, dtype)  # [q | k | v] columns, as the model's
        k_new, v_new = (h[..., a * H_kv * D:(a + 1) * H_kv * D].view(B, 1, H_kv, D).transpose(1, 2) for a in (1, 2))
        p = torch.tensor([pos], device=DEV)
        quant_append_ref(p, k_new, v_new, *ref, bits, group, clip, sup)
        quant_append_triton(p, k_new, v_new, *tri, bits, group, clip, sup)
        diff = [n for n, u, v in zip(("k_res", "v_res", "codes", "scale", "mn"), ref, tri) if not torch.equal(u, v)]
        if diff:
            bad += 1
            print("MISMATCH", mode, bits, group, clip, fp8, dtype, n_rows, "pos", pos, diff)
            break
print("cases failed:", bad)
"""


def test_quant_append_matches_reference_interpreted():
    check_interpreted(APPEND_CHECK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quant_append_compiled_on_cuda():
    check_compiled(APPEND_CHECK)
