"""kernels/pack.py and pack_triton.py: KIVI-style quantize + bit packing. Triton must match the
torch reference bit for bit (run in the Triton interpreter on CPU, in a subprocess: see
interpreted.py); the reference itself is checked against the format's promises."""
import pytest
import torch

from interpreted import check_compiled, check_interpreted
from kernels.pack import quantize_pack, quantize_pack_ref, unpack_dequant, unpack_dequant_ref

# One subprocess loops over every case and prints one line per mismatch.
_COMPARE = r"""
import os
import torch
from kernels.pack import quantize_pack, quantize_pack_ref, unpack_dequant_ref
from kernels.pack_triton import quantize_pack_triton, unpack_dequant_triton
DEV = os.environ["KERNEL_TEST_DEVICE"]

def data(lead, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, T, D, generator=g) * 2 + 0.3
    x[..., :, :8] = 0.75           # constant channels: every per-channel group constant there
    x[..., :1, :] = -1.25          # a constant token: every per-token group constant there
    return x.to(dtype).to(DEV)

def check(name, x, bits, group, pc):
    a = quantize_pack_ref(x, bits, group, pc)
    b = quantize_pack_triton(x, bits, group, pc)
    bad = [n for n, u, v in zip(("codes", "scale", "mn"), a, b)
           if u.shape != v.shape or u.dtype != v.dtype or not torch.equal(u, v)]
    for out_dtype in (None,) if x.dtype == torch.float32 else (None, torch.float32):  # None: scale's dtype
        u = unpack_dequant_ref(*a, bits, group, pc, out_dtype)
        v = unpack_dequant_triton(*a, bits, group, pc, out_dtype)
        if u.dtype != v.dtype or not torch.equal(u, v):
            bad.append(f"unpack->{out_dtype}")
    if bad:
        print(f"FAIL {name} bits={bits} group={group} per_channel={pc} shape={tuple(x.shape)} "
              f"{x.dtype}: {bad}")
    failed.append(bool(bad))
    return 1

failed, n, seed = [], 0, 0
for bits in (1, 2, 4):
    for D in (64, 128):
        for group in (32, 64):
            # two sequences fold into the rows (a per-channel group must not straddle them); 33 tokens
            # make several programs with a masked last one
            for T in (1, 7, 33):
                seed += 1
                n += check("token", data((2,), T, D, torch.float32, seed), bits, group, False)
            seed += 1
            n += check("channel", data((2,), 2 * group, D, torch.float32, seed), bits, group, True)
    # half precision storage, non-power-of-two sizes (masked tiles), no leading dims
    n += check("token", data((2,), 5, 128, torch.float16, bits), bits, 64, False)
    n += check("channel", data((2,), 128, 128, torch.float16, bits), bits, 64, True)
    n += check("token-odd", data((), 3, 96, torch.float32, bits), bits, 48, False)
    n += check("channel-odd", data((1,), 48, 40, torch.float32, bits), bits, 24, True)
    # non-contiguous input: (B, T, H, D) viewed as (B, H, T, D), as the cache sees it
    xt = data((2, 16), 3, 64, torch.float32, 100 + bits).transpose(1, 2)
    n += check("token-strided", xt, bits, 32, False)
    xt = data((2, 32), 3, 64, torch.float32, 200 + bits).transpose(1, 2)
    n += check("channel-strided", xt, bits, 32, True)

def group_sse(x, q, bits, group, pc):
    # squared error of the dequantized q = (codes, scale, mn), per group, float64
    d = (unpack_dequant_ref(*q, bits, group, pc, torch.float32).double() - x.double()) ** 2
    return d.unflatten(-2, (-1, group)).sum(-2) if pc else d.unflatten(-1, (-1, group)).sum(-1)

def check_clip(name, x, bits, group, pc):
    # clip=True: scale/mn and codes bit for bit, except on near-ties, where the two sides may keep
    # different candidates (error sums reduced in another order) whose errors agree to 1e-5
    a = quantize_pack_ref(x, bits, group, pc, clip=True)
    b = quantize_pack_triton(x, bits, group, pc, clip=True)
    same = (a[1] == b[1]) & (a[2] == b[2])  # per group
    ea, eb = group_sse(x, a, bits, group, pc), group_sse(x, b, bits, group, pc)
    tie = (ea - eb).abs() <= 1e-5 * torch.maximum(ea, eb) + 1e-12
    deq_same = group_sse(x, a, bits, group, pc) == group_sse(x, b, bits, group, pc)
    bad = []
    if not (same | tie).all() or not deq_same[same].all():
        bad.append("choice")
    if (~same).float().mean() > 0.01:
        bad.append(f"{int((~same).sum())} of {same.numel()} groups differ")
    # clipping must beat or equal min/max in every group, and change something on Gaussian data
    e0 = group_sse(x, quantize_pack_ref(x, bits, group, pc), bits, group, pc)
    if not (ea <= e0 * (1 + 1e-6)).all() or not (ea.sum() < e0.sum()):
        bad.append("not better than min/max")
    if bad:
        print(f"FAIL clip {name} bits={bits} group={group} per_channel={pc} {x.dtype}: {bad}")
    failed.append(bool(bad))
    return 1

for bits in (1, 2, 4):
    n += check_clip("token", data((2,), 33, 64, torch.float32, 300 + bits), bits, 32, False)
    n += check_clip("channel", data((2,), 64, 64, torch.float32, 310 + bits), bits, 32, True)
    n += check_clip("token-fp16", data((2,), 5, 128, torch.float16, 320 + bits), bits, 64, False)
    n += check_clip("channel-fp16", data((1,), 128, 128, torch.float16, 330 + bits), bits, 64, True)
    n += check_clip("token-odd", data((), 3, 96, torch.float32, 340 + bits), bits, 48, False)
    n += check_clip("channel-odd", data((1,), 48, 40, torch.float32, 350 + bits), bits, 24, True)

# dispatch: LAYERKV_KERNELS=triton (read at each call) routes CPU tensors to the kernel
os.environ["LAYERKV_KERNELS"] = "triton"
x = data((1, 2), 64, 64, torch.float32, 7)
c = quantize_pack(x, 2, 32, True)
if not all(torch.equal(u, v) for u, v in zip(c, quantize_pack_ref(x, 2, 32, True))):
    print("FAIL dispatch")
    failed.append(True)
assert n == 84, f"{n} cases ran, not 84"
print(f"{n} cases, cases failed: {sum(failed)}")
"""


def test_triton_matches_reference_bitwise():
    check_interpreted(_COMPARE)


def _expand(s, group, per_channel):
    return s.float().repeat_interleave(group, dim=-2 if per_channel else -1)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_error_bound(per_channel, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 128, 128, generator=g).to(dtype)
    rel = []
    for bits in (1, 2, 4):
        codes, scale, mn = quantize_pack(x, bits, 64, per_channel)  # CPU: the reference
        assert codes.shape == (2, 3, 128, 128 * bits // 8) and codes.dtype == torch.uint8
        assert scale.dtype == mn.dtype == dtype
        x_hat = unpack_dequant(codes, scale, mn, bits, 64, per_channel)
        assert x_hat.dtype == dtype and x_hat.shape == x.shape
        err = (x.float() - x_hat.float()).abs()
        # half the quantization step, plus the rounding of the stored scale (levels * ulp, inside the
        # step for fp32) and of the output cast
        ulp = torch.finfo(dtype).eps
        bound = _expand(scale, 64, per_channel) / 2 * (1 + 2 ** bits * ulp) + x.float().abs() * ulp + 1e-6
        assert (err <= bound).all(), (bits, (err - bound).max().item())
        rel.append(err.mean().item() / x.float().abs().mean().item())
    assert rel[0] > rel[1] > rel[2], rel
    assert rel[2] < 0.1, rel


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_constant_groups_round_trip_exactly(bits):
    x = torch.arange(4 * 64, dtype=torch.float32).view(4, 64) / 7  # (T, D)
    # per-token, group 16: each group of 16 channels constant
    xt = x[:, ::16].repeat_interleave(16, -1)
    codes, scale, mn = quantize_pack(xt, bits, 16, False)
    assert (codes == 0).all() and (scale == 0).all()
    assert torch.equal(unpack_dequant(codes, scale, mn, bits, 16, False), xt)
    # per-channel, group 2: each channel constant over each pair of tokens
    xc = x[::2].repeat_interleave(2, 0)
    codes, scale, mn = quantize_pack(xc, bits, 2, True)
    assert (codes == 0).all() and (scale == 0).all()
    assert torch.equal(unpack_dequant(codes, scale, mn, bits, 2, True), xc)


@pytest.mark.parametrize("bits,values,packed", [
    (2, [1, 2, 3, 0], [0b00111001]),  # 1 | 2<<2 | 3<<4 | 0<<6 = 57
    (1, [1, 0, 1, 1, 0, 0, 0, 1], [0b10001101]),  # element d at bit d
    (4, [5, 0, 15, 9], [0x05, 0x9F]),  # low nibble first
])
def test_packing_layout(bits, values, packed):
    # one group spanning the row, min 0 and max 2**bits - 1: scale 1, so codes == values
    x = torch.tensor([values], dtype=torch.float32)  # (T=1, D)
    for fn in (quantize_pack_ref, quantize_pack):
        codes, scale, mn = fn(x, bits, len(values), False)
        assert codes.tolist() == [packed]
        assert scale.tolist() == [[1.0]] and mn.tolist() == [[0.0]]
    codes = torch.tensor([packed], dtype=torch.uint8)
    one, zero = torch.ones(1, 1), torch.zeros(1, 1)
    assert torch.equal(unpack_dequant_ref(codes, one, zero, bits, len(values), False), x)


def test_rounding_is_floor_half_up():
    # 2-bit, range [0, 3]: 0.5 -> 1 and 2.5 -> 3 (floor(y + 0.5)), 1.49 -> 1
    x = torch.tensor([[0.0, 0.5, 2.5, 3.0, 1.49, 0.0, 0.0, 0.0]])
    codes, _, _ = quantize_pack_ref(x, 2, 8, False)
    q = unpack_dequant_ref(codes, torch.ones(1, 1), torch.zeros(1, 1), 2, 8, False)
    assert q.tolist() == [[0.0, 1.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0]]


def test_invalid_arguments():
    x = torch.randn(2, 64, 64)
    with pytest.raises(ValueError, match="bits"):
        quantize_pack(x, 3, 32, False)
    with pytest.raises(ValueError, match="per-token"):
        quantize_pack(x, 2, 48, False)  # 64 % 48
    with pytest.raises(ValueError, match="per-channel"):
        quantize_pack(torch.randn(2, 40, 64), 2, 32, True)  # T=40 % 32
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_pack(torch.randn(2, 4, 4), 1, 4, False)  # D=4, 8 one-bit codes per byte
    with pytest.raises(ValueError, match="T, D"):
        quantize_pack(torch.randn(64), 2, 32, False)
    with pytest.raises(ValueError, match="group"):
        quantize_pack(x, 2, 0, False)
    codes, scale, mn = quantize_pack(x, 2, 32, True)
    with pytest.raises(ValueError, match="shape"):
        unpack_dequant(codes, scale, mn, 2, 32, False)  # per-channel scales read as per-token
    with pytest.raises(ValueError, match="bits"):
        unpack_dequant(codes, scale, mn, 5, 32, True)
    with pytest.raises(ValueError, match="uint8"):
        unpack_dequant(codes.int(), scale, mn, 2, 32, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")
def test_compiled_kernels_match_reference_on_cuda():
    """The bitwise check above with the kernels compiled for the GPU and the references on CUDA."""
    check_compiled(_COMPARE)
