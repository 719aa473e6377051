"""kernels/e4m3.py and kernels/fp8.py: the e4m3 byte and QuantKV's 8-bit ranges. The Triton side
(the e4m3 helpers, the quantize kernels' FP8 path) must match the torch references (interpreted on
CPU, compiled on a GPU: see interpreted.py); the references are checked against the format's promises."""
import pytest
import torch

from interpreted import check_compiled, check_interpreted
from kernels import e4m3, fp8
from kernels.pack import quantize_pack, unpack_dequant


def _expand(s, group, per_channel):
    return s.float().repeat_interleave(group, dim=-2 if per_channel else -1)


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


def test_decode_equals_torch_float8():
    """e4m3.decode's table lookup == converting each byte through torch.float8_e4m3fn, every byte
    (NaN bytes included: the table is that conversion) and any shape, times the superscale."""
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(2, 1, 8, 16)
    sup = torch.tensor([[0.5], [3.0]])
    want = b.view(torch.float8_e4m3fn).float() * sup[..., None, None]
    torch.testing.assert_close(e4m3.decode(b, sup), want, rtol=0, atol=0, equal_nan=True)


def test_e4m3_is_exact_in_triton():
    """The kernel-side e4m3 matches torch's float8_e4m3fn: widening for every byte (subnormals,
    signs, 448), and encoding to nearest (ties to even, -0) with both neighbours for ~4k values."""
    check_interpreted(_E4M3)


_FP8_COMPARE = r"""
import os
import torch
from kernels.fp8 import quantize_pack_fp8, quantize_pack_fp8_ref, superscale, unpack_dequant_fp8
from kernels.pack_triton import quantize_pack_triton
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
@pytest.mark.parametrize("script", ["e4m3", "fp8"])
def test_compiled_kernels_match_reference_on_cuda(script):
    """The two checks above with the kernels compiled for the GPU and the references on CUDA."""
    check_compiled({"e4m3": _E4M3, "fp8": _FP8_COMPARE}[script])


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_fp8_ranges_round_trip(per_channel, clip):
    """With a superscale the ranges come back as bytes, the codes are the nearest levels of the
    stored ranges, and each group's byte pair is no worse than rounding both to nearest: the squared
    error is about that of float ranges (min/max ranges even gain: a one-ulp clip search)."""
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


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_reference_in_slices_stores_the_same(per_channel, monkeypatch):
    """The reference weighs its 9 range candidates a slice of tokens at a time (SLICE_VALUES, so a
    long prompt's candidates stay small): many slices (here 32 tokens each) == one, and a slice
    smaller than a group's tokens (one value) takes one group of tokens at a time."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 320, 64, generator=g) * torch.rand(1, 2, 1, 64, generator=g) * 4
    sup = fp8.superscale(x)
    out = []
    for values in (1 << 30, 32 * 2 * 64, 1):
        monkeypatch.setattr(fp8, "SLICE_VALUES", values)
        out.append(fp8.quantize_pack_fp8_ref(x, 2, 32, per_channel, True, sup))
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*out))
