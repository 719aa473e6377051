"""kernels/pack.py: KIVI-style quantize + bit packing. Triton must match the torch reference bit for bit
(run in the Triton interpreter on CPU, in a subprocess: see interpreted.py); the reference itself is
checked against the format's promises."""
import pytest
import torch

from interpreted import check_compiled, check_interpreted
from kernels.pack import quantize_pack, quantize_pack_ref, unpack_dequant, unpack_dequant_ref

# One subprocess loops over every case and prints one line per mismatch.
_COMPARE = r"""
import os
import torch
from kernels.pack import (quantize_pack, quantize_pack_ref, quantize_pack_triton,
                          unpack_dequant_ref, unpack_dequant_triton)
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


# ---- 8-bit ranges (kernels/fp8.py) -------------------------------------------------------------------
_E4M3 = r"""
import os, torch, triton, triton.language as tl
from kernels import e4m3
DEV = os.environ["KERNEL_TEST_DEVICE"]

@triton.jit
def widen(B, OUT):
    i = tl.arange(0, 256)
    tl.store(OUT + i, e4m3.e4m3_to_f32(tl.load(B + i)))

@triton.jit
def narrow(Y, OUT, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(Y + i, mask=i < N, other=0.0)
    b = e4m3.f32_to_e4m3(y)
    for d in tl.static_range(3):  # nearest, down, up: the rows of e4m3.neighbours
        tl.store(OUT + d * N + i, e4m3.e4m3_toward(y, b, d).to(tl.uint8), mask=i < N)

b = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEV)
out = torch.empty(256, device=DEV)
widen[(1,)](b, out)
want = e4m3.decode(b.view(1, 1, 1, 256), torch.ones(1, 1, device=DEV)).view(256).cpu()
out = out.cpu()
ok = [i for i in range(256) if i & 127 != 127]  # 0x7f / 0xff are NaN: never stored (encode saturates)
bad = [i for i in ok if out[i].item() != want[i].item()]
print(f"FAIL widen bytes {bad[:8]}" if bad else "")

# every value, every midpoint between neighbours (ties to even), one float32 ulp either side of
# each midpoint, random magnitudes from subnormal to large, signed zeros and the saturation ends
vals = want[ok].unique()
mids = (vals[1:] + vals[:-1]) / 2  # exact in float32
big, g = torch.full_like(mids, 1e9), torch.Generator().manual_seed(0)
ys = torch.cat([vals, mids, mids.nextafter(big), mids.nextafter(-big),
                torch.randn(2000, generator=g) * torch.logspace(-4, 2.6, 2000),
                torch.tensor([0.0, -0.0, 1e-30, -1e-30, 448.0, -448.0])]).clamp(-448, 448).to(DEV)
got = torch.empty(3, ys.numel(), dtype=torch.uint8, device=DEV)
narrow[(triton.cdiv(ys.numel(), 512),)](ys, got, ys.numel(), BLOCK=512)
want = e4m3.neighbours(ys.view(1, 1, 1, -1), torch.ones(1, 1, device=DEV)).view(3, -1)
wrong = (got != want).any(0).nonzero()[:, 0]
print(f"FAIL narrow {ys[wrong[:8]].tolist()}: {got[:, wrong[:8]].T.tolist()} != {want[:, wrong[:8]].T.tolist()}"
      if len(wrong) else "")
print(f"cases failed: {len(bad) + len(wrong)}")
"""


def test_e4m3_is_exact_in_triton():
    """The kernel-side e4m3 matches torch's float8_e4m3fn: widening for every byte (subnormals,
    signs, 448), and encoding to nearest (ties to even, -0) with both neighbours for ~4k values."""
    check_interpreted(_E4M3)


_FP8_COMPARE = r"""
import os
import torch
from kernels.fp8 import quantize_pack_fp8, quantize_pack_fp8_ref, superscale, unpack_dequant_fp8
from kernels.pack import quantize_pack_triton
DEV = os.environ["KERNEL_TEST_DEVICE"]

def data(lead, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, T, D, generator=g) * torch.rand(*lead[:-1], 1, 1, D, generator=g) * 3 + 0.3
    x[..., :, :8] = 0.75   # constant channels: every per-channel group constant there
    x[..., :1, :] = -1.25  # a constant token
    return x.to(dtype).to(DEV)

def group_sse(x, q, bits, group, pc, sup):
    d = (unpack_dequant_fp8(*q, bits, group, pc, sup).double() - x.double()) ** 2
    return d.unflatten(-2, (-1, group)).sum(-2) if pc else d.unflatten(-1, (-1, group)).sum(-1)

# Bytes and codes bit for bit, except on near-ties between two candidates (error sums reduced in
# another order: kernels/ranges.py), where the errors must agree to 1e-5; at most 1% of groups.
failed, n = [], 0
for bits in (1, 2, 4):
    for clip in (False, True):
        for pc, T, D, group, dtype in ((False, 33, 64, 32, torch.float32), (True, 64, 64, 32, torch.float32),
                                       (False, 1, 128, 32, torch.float32),  # a decode step's value row
                                       (False, 5, 128, 64, torch.float16), (True, 48, 40, 24, torch.float16)):
            x = data((2, 3), T, D, dtype, 10 * bits + T)
            sup = superscale(x)
            a = quantize_pack_fp8_ref(x, bits, group, pc, clip, sup)
            b = quantize_pack_triton(x, bits, group, pc, clip, sup)
            same = (a[1] == b[1]) & (a[2] == b[2])  # per group
            ea, eb = group_sse(x, a, bits, group, pc, sup), group_sse(x, b, bits, group, pc, sup)
            tie = (ea - eb).abs() <= 1e-5 * torch.maximum(ea, eb) + 1e-12
            bad = [k for k, u, v in zip(("codes", "scale", "mn"), a, b) if u.shape != v.shape or u.dtype != v.dtype]
            if not (same | tie).all() or (~same).float().mean() > 0.01:
                bad.append(f"{int((~same).sum())} of {same.numel()} groups differ")
            if same.all() and not torch.equal(a[0], b[0]):
                bad.append("codes")
            if bad:
                print(f"FAIL bits={bits} clip={clip} per_channel={pc} T={T} D={D} {dtype}: {bad}")
            failed.append(bool(bad))
            n += 1

# dispatch: LAYERKV_KERNELS=triton routes CPU tensors to the kernel; a wrong superscale is refused
os.environ["LAYERKV_KERNELS"] = "triton"
x = data((1, 2), 64, 64, torch.float32, 7)
if not all(torch.equal(u, v) for u, v in zip(quantize_pack_fp8(x, 2, 32, True, False, superscale(x)),
                                             quantize_pack_fp8_ref(x, 2, 32, True, False, superscale(x)))):
    print("FAIL dispatch")
    failed.append(True)
try:
    quantize_pack_fp8(x, 2, 32, True, False, superscale(x).double())
    print("FAIL float64 superscale accepted")
    failed.append(True)
except ValueError:
    pass
assert n == 30, f"{n} cases ran, not 30"
print(f"{n} cases, cases failed: {sum(failed)}")
"""


def test_fp8_triton_matches_reference():
    """The quantize kernels with 8-bit ranges (range, byte rounding and codes in one kernel) write
    what the torch reference does."""
    check_interpreted(_FP8_COMPARE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")
@pytest.mark.parametrize("script", ["pack", "e4m3", "fp8"])
def test_compiled_kernels_match_reference_on_cuda(script):
    """The three checks above with the kernels compiled for the GPU and the references on CUDA."""
    check_compiled({"pack": _COMPARE, "e4m3": _E4M3, "fp8": _FP8_COMPARE}[script])


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_fp8_ranges_round_trip(per_channel, clip):
    """With a superscale the ranges come back as bytes, the codes are the nearest levels of the
    stored ranges, and each group's byte pair is no worse than rounding both to nearest: the squared
    error is about that of float ranges (min/max ranges even gain: a one-ulp clip search)."""
    from kernels import e4m3, fp8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, 64, generator=g) * torch.rand(1, 3, 1, 64, generator=g) * 4  # uneven channels
    sup = fp8.superscale(x)
    assert sup.shape == (2, 3) and torch.equal(sup, x.abs().amax(dim=(2, 3)) / 32)
    for bits in (1, 2, 4):
        levels = (1 << bits) - 1
        codes, s8, m8 = fp8.quantize_pack_fp8(x, bits, 32, per_channel, clip, sup)
        assert s8.dtype == m8.dtype == torch.uint8 and codes.shape == (2, 3, 128, 64 * bits // 8)
        x_hat = fp8.unpack_dequant_fp8(codes, s8, m8, bits, 32, per_channel, sup)
        assert x_hat.dtype == torch.float32
        step, lo = (_expand(e4m3.decode(t, sup), 32, per_channel) for t in (s8, m8))
        nearest_level = torch.floor((x - lo) / step + 0.5).clamp(0, levels) * step + lo
        assert torch.equal(x_hat, nearest_level), bits
        _, s, m = quantize_pack(x, bits, 32, per_channel, clip=clip)  # float ranges
        s0, m0 = (_expand(e4m3.decode(e4m3.encode(t, sup), sup), 32, per_channel) for t in (s, m))
        nearest_pair = torch.floor((x - m0) / s0 + 0.5).clamp(0, levels) * s0 + m0
        mse, mse_nearest = (x - x_hat).square().mean(), (x - nearest_pair).square().mean()
        mse_float = (x - unpack_dequant(*quantize_pack(x, bits, 32, per_channel, clip=clip), bits, 32,
                                        per_channel)).square().mean()
        assert mse <= mse_nearest and mse <= (1.05 if clip else 1.0) * mse_float, (bits, mse, mse_nearest, mse_float)
