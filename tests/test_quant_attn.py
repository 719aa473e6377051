"""Decode attention over the packed KIVI cache (kernels/quant_attn.py, kernels/quant_attn_triton.py).

The reference is checked against dense attention on K/V dequantized here, independently (own packing,
own dequantization); the Triton kernel is checked against the reference under TRITON_INTERPRET=1 in a
subprocess, because triton reads that variable once at import and another test may import it first.
Run this file as a script to run the Triton cases directly.

The cache's state follows from the newest token's position `pos` alone (see the kernel's docstring):
with R the residual / ring size, keys [0, n_kq) are packed, n_kq = pos - pos % R, and values
[0, n_vq), n_vq = max(0, pos + 1 - R); the rest are in full precision.
"""
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from interpreted import check_interpreted  # noqa: E402
from kernels import e4m3  # noqa: E402
from kernels.dense_attn import decode_attention  # noqa: E402
from kernels.quant_attn import (pack_mask, quant_decode_attention, quant_decode_attention_ref,  # noqa: E402
                                unpack_mask)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes (..., D) -> uint8 (..., D // per); code d goes to byte d // per, bit (d % per) * bits."""
    per = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)  # (..., D // per, per)
    packed = torch.zeros(c.shape[:-1], dtype=torch.int32)
    for i in range(per):
        packed |= c[..., i] << (i * bits)
    return packed.to(torch.uint8)


def make_case(B=1, H=4, H_kv=2, D=64, bits=2, G=32, R=64, pos=99, T_cap=None, seed=0, wide=False, held=0,
              fp8=False):
    """Random cache contents in the layout the kernel reads after the token at `pos`, plus the dense
    K/V (B, H_kv, pos + 1, D) they stand for. wide=True stores residuals/scales as slices of wider
    buffers and q transposed, so only .stride() describes them. Unused code rows and residual slots
    hold random codes and huge values: reading one by mistake wrecks the result. held = S adds
    full-precision rows for S tokens per KV head (token 0 and S - 1 others at random, different in
    every head), large (as real sinks are), which the dense K/V take at those positions. fp8=True
    stores the scales and mins as e4m3 bytes of random per-head superscales (kernels/fp8.py)."""
    g = torch.Generator().manual_seed(seed)
    length, n_kq, n_vq = pos + 1, pos - pos % R, max(0, pos + 1 - R)
    T_cap = (max(n_kq, n_vq) // G + 2) * G if T_cap is None else T_cap  # a multiple of G, with unused rows
    assert R % G == 0 and max(n_kq, n_vq) <= T_cap and T_cap % G == 0, "not a valid cache"
    levels = (1 << bits) - 1

    def rand(*shape, lo=-1.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    def strided(x):  # same values, viewed out of a buffer twice as wide in the last dim
        if not wide:
            return x
        fill = 1e4 if x.is_floating_point() else 0x77  # 0x77: e4m3 240, a huge range
        buf = torch.full((*x.shape[:-1], 2 * x.shape[-1]), fill, dtype=x.dtype)
        buf[..., :x.shape[-1]] = x
        return buf[..., :x.shape[-1]]

    k_int = torch.randint(0, levels + 1, (B, H_kv, T_cap, D), generator=g)
    v_int = torch.randint(0, levels + 1, (B, H_kv, T_cap, D), generator=g)
    k_scale, k_mn = rand(B, H_kv, T_cap // G, D, lo=0.1, hi=2.0) / levels, rand(B, H_kv, T_cap // G, D)
    v_scale, v_mn = rand(B, H_kv, T_cap, D // G, lo=0.1, hi=2.0) / levels, rand(B, H_kv, T_cap, D // G)
    sups = {}
    if fp8:  # the ranges as stored: bytes; the dense K/V below use what they decode to
        sups = dict(k_sup=rand(B, H_kv, lo=0.01, hi=0.1), v_sup=rand(B, H_kv, lo=0.01, hi=0.1))
        k_scale, k_mn = (e4m3.encode(t, sups["k_sup"]) for t in (k_scale, k_mn))
        v_scale, v_mn = (e4m3.encode(t, sups["v_sup"]) for t in (v_scale, v_mn))
    widen = {"k": lambda t: e4m3.decode(t, sups["k_sup"]) if fp8 else t,
             "v": lambda t: e4m3.decode(t, sups["v_sup"]) if fp8 else t}
    k_res = torch.full((B, H_kv, R, D), 1e4)
    k_res[:, :, :length - n_kq] = rand(B, H_kv, length - n_kq, D, lo=-2, hi=2)
    v_res = torch.full((B, H_kv, R, D), 1e4)
    slots = torch.arange(n_vq, length) % R  # ring: token t lives in slot t % R
    v_res[:, :, slots] = rand(B, H_kv, length - n_vq, D, lo=-2, hi=2)
    q = rand(B, 1, H, D, lo=-2, hi=2).transpose(1, 2) if wide else rand(B, H, 1, D, lo=-2, hi=2)

    # Dense K/V, dequantized directly from the integer codes (no unpacking involved).
    k_deq = k_int * widen["k"](k_scale).repeat_interleave(G, dim=2) + widen["k"](k_mn).repeat_interleave(G, dim=2)
    v_deq = v_int * widen["v"](v_scale).repeat_interleave(G, dim=3) + widen["v"](v_mn).repeat_interleave(G, dim=3)
    k = torch.cat([k_deq[:, :, :n_kq], k_res[:, :, :length - n_kq]], dim=2)  # (B, H_kv, length, D)
    v = torch.cat([v_deq[:, :, :n_vq], v_res[:, :, slots]], dim=2)  # (B, H_kv, length, D)

    args = dict(q=q, k_codes=pack_codes(k_int, bits), k_scale=strided(k_scale), k_mn=k_mn, k_res=strided(k_res),
                v_codes=pack_codes(v_int, bits), v_scale=v_scale, v_mn=strided(v_mn), v_res=strided(v_res),
                pos=torch.tensor([pos]), bits=bits, group=G, **sups)
    if held:
        order = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(length - 1, generator=g)])
                             for _ in range(B * H_kv)]).view(B, H_kv, length)
        at = order[..., :held].sort(-1).values  # (B, H_kv, S) held positions, token 0 among them
        mask = torch.zeros(B, H_kv, T_cap + R, dtype=torch.bool).scatter_(2, at, True)
        args.update(k_held=rand(B, H_kv, held, D, lo=-3, hi=3), v_held=strided(rand(B, H_kv, held, D, lo=-5, hi=5)),
                    held_mask=pack_mask(mask))
        rows = at[..., None].expand(-1, -1, -1, D)
        k, v = k.scatter(2, rows, args["k_held"]), v.scatter(2, rows, args["v_held"])
    return args, k, v


# -- reference ---------------------------------------------------------------------------------------------
def test_ref_matches_dense_on_dequantized():
    for bits in (1, 2, 4):
        for kw in (dict(), dict(pos=199, R=128), dict(H=6, H_kv=2, pos=36, R=32), dict(wide=True, pos=149),
                   dict(held=1), dict(held=4, pos=149, wide=True), dict(held=3, pos=2), dict(held=40, pos=199),
                   dict(fp8=True, pos=199, R=64), dict(fp8=True, held=4, pos=149, wide=True)):
            args, k, v = make_case(bits=bits, seed=bits, **kw)
            torch.testing.assert_close(quant_decode_attention_ref(**args), decode_attention(args["q"], k, v),
                                       rtol=1e-5, atol=1e-6, msg=f"bits={bits} {kw}")


def test_ref_quantized_from_floats():
    """4-bit min/max quantization of known K/V: the reference equals dense attention on the dequantized
    tensors, and is close to attention on the originals."""
    torch.manual_seed(0)
    B, H, H_kv, D, G, R, length = 2, 4, 1, 64, 32, 64, 160
    n_kq, n_vq = 128, length - R
    k_f, v_f = torch.randn(B, H_kv, length, D), torch.randn(B, H_kv, length, D)
    q = torch.randn(B, H, 1, D)

    def quantize(x, dim):  # groups of G along `dim` of x (..., T, D): per channel (2) or per token (3)
        shape = x.shape
        xg = x.unflatten(dim, (shape[dim] // G, G))
        mn, mx = xg.amin(dim + 1, keepdim=True), xg.amax(dim + 1, keepdim=True)
        scale = (mx - mn) / 15
        codes = ((xg - mn) / scale).round().clamp(0, 15)
        return codes.flatten(dim, dim + 1), scale.squeeze(dim + 1), mn.squeeze(dim + 1), (codes * scale + mn).flatten(dim, dim + 1)

    k_codes, k_scale, k_mn, k_deq = quantize(k_f[:, :, :n_kq], 2)
    v_codes, v_scale, v_mn, v_deq = quantize(v_f[:, :, :n_vq], 3)
    k_res = torch.zeros(B, H_kv, R, D)
    k_res[:, :, :length - n_kq] = k_f[:, :, n_kq:]
    v_res = torch.zeros(B, H_kv, R, D)
    v_res[:, :, torch.arange(n_vq, length) % R] = v_f[:, :, n_vq:]  # wrapped: n_vq = 96 is past R
    assert (n_kq, n_vq) == (length - 1 - (length - 1) % R, length - R)  # the state after token length - 1
    out = quant_decode_attention_ref(q, pack_codes(k_codes, 4), k_scale, k_mn, k_res, pack_codes(v_codes, 4),
                                     v_scale, v_mn, v_res, length - 1, 4, G)
    k = torch.cat([k_deq, k_f[:, :, n_kq:]], dim=2)
    v = torch.cat([v_deq, v_f[:, :, n_vq:]], dim=2)
    torch.testing.assert_close(out, decode_attention(q, k, v), rtol=1e-5, atol=1e-6)
    err = (out - decode_attention(q, k_f, v_f)).abs().max().item()
    assert err < 0.1, f"4-bit attention output error {err}"


def test_ref_all_residual_is_dense_attention():
    args, _, _ = make_case(pos=49, R=64, T_cap=0)  # nothing quantized, empty code store
    dense = decode_attention(args["q"], args["k_res"][:, :, :50], args["v_res"][:, :, :50])
    assert torch.equal(quant_decode_attention_ref(**args), dense)


def test_ref_ring_order_matters():
    """With a wrapped ring, reading v_res in slot order instead of token order gives another answer."""
    args, k, v = make_case(pos=99, R=64, seed=3)  # tokens 36..99 in slots 36..63, then 0..35
    out = quant_decode_attention_ref(**args)
    torch.testing.assert_close(out, decode_attention(args["q"], k, v), rtol=1e-5, atol=1e-6)
    v_wrong = torch.cat([v[:, :, :36], args["v_res"]], dim=2)  # the mistake: slots 0..63 ascending
    assert not torch.allclose(out, decode_attention(args["q"], k, v_wrong), atol=1e-3)


def test_pack_mask_round_trip():
    """Bit t % 8 of byte t // 8; unpack_mask inverts pack_mask at any length, odd ones included."""
    mask = torch.zeros(2, 3, 21, dtype=torch.bool)
    mask[0, 0, [0, 9]] = True  # the docstring's example
    mask[1, 2, 20] = True
    packed = pack_mask(mask)
    assert packed.shape == (2, 3, 3) and packed.dtype == torch.uint8
    assert packed[0, 0].tolist() == [0b00000001, 0b00000010, 0] and packed[1, 2, 2] == 0b00010000
    assert torch.equal(unpack_mask(packed, 21), mask) and torch.equal(unpack_mask(packed, 10), mask[..., :10])
    rand = torch.rand(1, 2, 37, generator=torch.Generator().manual_seed(0)) < 0.3
    assert torch.equal(unpack_mask(pack_mask(rand), 37), rand)


def test_held_tokens_replace_store_entries():
    """A held token's store entry is never read: changing it changes nothing; changing its row does."""
    args, k, v = make_case(pos=199, R=64, held=6, seed=5)
    want = decode_attention(args["q"], k, v)
    torch.testing.assert_close(quant_decode_attention_ref(**args), want, rtol=1e-5, atol=1e-6)
    at = unpack_mask(args["held_mask"], 200)[0, 0].nonzero()[:, 0]
    stored = [t for t in at.tolist() if t < 128]  # packed keys: 0..127 (n_kq = 128)
    assert stored, "the case must hold a token in the packed store"
    args["k_codes"][:, 0, stored] ^= 0xFF  # every code of the held tokens' store entries flipped
    torch.testing.assert_close(quant_decode_attention_ref(**args), want, rtol=1e-5, atol=1e-6)
    args["k_held"] = args["k_held"] + 1
    assert not torch.allclose(quant_decode_attention_ref(**args), want, atol=1e-3)


def test_sm_scale_and_cpu_dispatch(monkeypatch):
    monkeypatch.delenv("LAYERKV_KERNELS", raising=False)
    args, k, v = make_case(pos=69)
    out = quant_decode_attention(**args, sm_scale=0.5)  # CPU tensors: the reference
    q = args["q"] * (0.5 * math.sqrt(64))  # decode_attention scales by 1/sqrt(D)
    torch.testing.assert_close(out, decode_attention(q, k, v), rtol=1e-5, atol=1e-6)


# -- Triton (interpreter) vs reference -------------------------------------------------------------------
TRITON_CASES = [
    dict(pos=0, R=64),  # one token
    dict(pos=36, H=4, H_kv=4, T_cap=0, bits=4),  # MHA, nothing quantized, empty code store
    dict(pos=36, H=6, H_kv=2, G=16, R=32, bits=1),  # GQA 3, one key block packed, 5 values
    dict(pos=199, H=8, H_kv=2, D=128, bits=4, G=64, R=64),  # GQA 4, D=128, 3 key blocks packed
    dict(pos=199, H=4, H_kv=1, bits=2, R=64, wide=True),  # wrapped ring, strided views
    dict(pos=199, H=4, H_kv=2, bits=1, R=128),  # R=128: one key block, ring wrapped past slot 0
    dict(pos=129, B=2, H=6, H_kv=2, bits=2, G=32, R=64, block_t=16, n_splits=3),  # batch of 2, 3 splits
    dict(pos=199, H=2, H_kv=2, bits=4, R=64, block_t=32, n_splits=4),  # several splits, partial last block
    dict(pos=150, H=4, H_kv=2, G=16, R=32, bits=2, held=2, block_t=32, n_splits=2),  # key groups < a block
    dict(pos=127, H=3, H_kv=1, bits=2, R=64, block_t=16, n_splits=5),  # both residuals full, ring at slot 0
    dict(pos=128, H=4, H_kv=2, D=128, bits=1, R=128),  # the first key block just packed: 1 residual key
    dict(pos=0, R=64, held=1),  # the only token is held: every split is empty
    dict(pos=199, H=8, H_kv=2, bits=2, R=64, held=4, wide=True),  # held tokens in the store and windows
    dict(pos=40, H=6, H_kv=2, bits=4, R=64, held=2, block_t=16, n_splits=3),  # held tokens in the windows
    dict(pos=299, B=2, H=8, H_kv=2, bits=2, R=64, held=60, block_t=16, n_splits=4),  # a fifth held
    dict(pos=199, B=2, H=8, H_kv=2, bits=2, R=64, fp8=True, block_t=16, n_splits=3),  # 8-bit ranges
    dict(pos=149, H=4, H_kv=1, D=128, bits=4, G=64, R=64, fp8=True, held=3, wide=True),  # ... with held rows
    # keys and values stored rotated (QuantKV's default): q rotated, the output rotated back, inside
    dict(pos=199, B=2, H=8, H_kv=2, D=128, bits=2, R=64, fp8=True, held=3, rotate="kv", block_t=16, n_splits=3),
    dict(pos=150, H=4, H_kv=2, G=16, R=32, bits=4, held=2, rotate="v", block_t=32, n_splits=2),  # values only
    dict(pos=40, H=4, H_kv=4, D=16, G=16, R=16, bits=2, rotate="kv"),  # head_dim 16: one slice of R
    # bfloat16, as a model runs it: the rotations' products in bfloat16 on tensor cores. Compiled
    # only: the interpreter's tl.dot multiplies bfloat16 operands' bit patterns (it stores them as
    # uint16; triton-lang/triton#11584, "not supported yet"), so every bfloat16 dot is garbage there
    dict(pos=199, H=8, H_kv=2, D=128, bits=4, G=64, R=64, held=3, rotate="kv", bf16=True, block_t=16, n_splits=3),
    dict(pos=199, H=8, H_kv=2, D=128, bits=2, G=32, R=64, fp8=True, held=3, bf16=True, block_t=16),
]


def run_triton_cases(device: str = "cpu") -> int:
    """Compare the kernel with the reference on every case, tensors on `device` (on a GPU strided
    views arrive as contiguous copies); print each failure, return their number."""
    from kernels.quant_attn_triton import quant_decode_attention_triton
    failures = 0
    for i, case in enumerate(TRITON_CASES):
        kw = {k: case[k] for k in ("block_t", "n_splits") if k in case}  # launch options, not the cache's
        rotate, bf16 = case.get("rotate", "none"), case.get("bf16", False)
        if bf16 and device == "cpu":  # the interpreter: see the cases' note
            continue
        args, _, _ = make_case(**{k: val for k, val in case.items() if k not in kw and k not in ("rotate", "bf16")})
        # an orthogonal matrix that is not symmetric, so a transposed use shows
        rot = torch.linalg.qr(torch.randn(args["q"].shape[-1], args["q"].shape[-1],
                                          generator=torch.Generator().manual_seed(i)))[0].contiguous()
        if bf16:  # every float of the cache in bfloat16 but the superscales; the reference in float32 from them
            low = lambda a: a.to(torch.bfloat16) if torch.is_tensor(a) and a.dtype == torch.float32 else a  # noqa: E731
            args = {k: (a if k.endswith("_sup") else low(a)) for k, a in args.items()}
            rot = rot.to(torch.bfloat16)
        args = {k: a.to(device) if torch.is_tensor(a) else a for k, a in args.items()}
        rot = rot.to(device)
        sm_scale = (None, 0.3)[i % 2]  # the default 1/sqrt(D) and a given scale, on alternate cases
        out = quant_decode_attention_triton(**args, sm_scale=sm_scale, rot=rot, rotate=rotate, **kw)
        wide = {k: a.float() if torch.is_tensor(a) and a.dtype == torch.bfloat16 else a for k, a in args.items()}
        q = wide["q"] @ rot.float() if rotate == "kv" else wide["q"]
        want = quant_decode_attention_ref(**{**wide, "q": q}, sm_scale=sm_scale)
        want = (want if rotate == "none" else want @ rot.float().T).to(out.dtype)
        # Error relative to the output's scale: elementwise relative error is meaningless where an
        # output is a near-zero average. Both sides sit ~1e-6 from a float64 evaluation.
        err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
        # bfloat16: q R and each split's output rounded before their products, the output rounded
        if out.shape != want.shape or out.dtype != want.dtype or not err < (2e-2 if bf16 else 1e-5):
            failures += 1
            print(f"FAIL {case} sm_scale={sm_scale}: relative error {err:.3g}", flush=True)
    os.environ["LAYERKV_KERNELS"] = "triton"  # the dispatch reaches the kernel when told to
    args, _, _ = make_case(pos=64)
    args = {k: a.to(device) if torch.is_tensor(a) else a for k, a in args.items()}
    if not torch.allclose(quant_decode_attention(**args), quant_decode_attention_ref(**args), rtol=1e-5, atol=1e-6):
        failures += 1
        print("FAIL dispatch with LAYERKV_KERNELS=triton", flush=True)
    print(f"{len(TRITON_CASES)} cases, cases failed: {failures}", flush=True)
    return failures


def test_triton_matches_ref_interpreted():
    check_interpreted(f"import runpy; runpy.run_path({os.path.abspath(__file__)!r}, run_name='__main__')")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")
def test_triton_matches_ref_compiled_on_cuda():
    assert run_triton_cases("cuda") == 0


FP16_CHECK = r"""
import torch
from test_quant_attn import make_case
from kernels.quant_attn import quant_decode_attention_ref
from kernels.quant_attn_triton import quant_decode_attention_triton
# A split's unnormalised sum over 2048 tokens of values ~40 is ~80k, past float16's 65504: the
# rotated-back output must be taken from the normalised one (kernels/splits.store_split_rotated)
args, _, _ = make_case(H=4, H_kv=1, D=64, bits=4, G=32, R=64, pos=2047)
args.update(q=torch.zeros_like(args["q"]), v_mn=torch.full_like(args["v_mn"], 40.0),
            v_scale=torch.full_like(args["v_scale"], 0.01), v_res=torch.full_like(args["v_res"], 40.0))
args = {k: a.half() if torch.is_tensor(a) and a.is_floating_point() else a for k, a in args.items()}
rot = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0].contiguous().half()
out = quant_decode_attention_triton(**args, rot=rot, rotate="v", n_splits=1, block_t=16).float()
want = quant_decode_attention_ref(**{k: a.float() if torch.is_tensor(a) and a.dtype == torch.half else a
                                     for k, a in args.items()}) @ rot.float().T
ok = torch.isfinite(out).all() and (out - want).abs().max() <= 1e-2 * want.abs().max()
print("cases failed:", 0 if ok else 1, (out - want).abs().max().item())
"""


def test_rotated_output_float16_does_not_overflow():
    check_interpreted(FP16_CHECK)


def test_torch_path_matches_reference():
    """The CPU path (codes read field by field, scale folded into q and the weights) equals the spec."""
    from kernels.quant_attn import quant_decode_attention_ref, quant_decode_attention_torch
    g = torch.Generator().manual_seed(0)
    for bits, G, H, H_kv, D, R, pos, S in [(2, 64, 9, 3, 64, 128, 299, 0),  # 256 keys, 172 values packed
                                           (1, 32, 8, 2, 128, 64, 256, 0),  # a key block just packed
                                           (4, 16, 4, 4, 32, 32, 39, 0),  # 32 keys, 8 values packed
                                           (4, 32, 6, 2, 64, 64, 19, 0),  # nothing packed
                                           (2, 64, 9, 3, 64, 128, 299, 4),  # 4 held, in the store or windows
                                           (4, 32, 6, 2, 64, 64, 19, 2),  # 2 held, in the windows
                                           (2, 32, 9, 3, 64, 128, 299, -3),  # 8-bit ranges, 3 held
                                           (1, 4, 4, 2, 32, 32, 70, 0)]:  # value groups narrower than a byte
        per, cap = 8 // bits, 320
        args = dict(
            k_codes=torch.randint(0, 256, (1, H_kv, cap, D // per), generator=g, dtype=torch.uint8),
            k_scale=torch.rand(1, H_kv, cap // G, D, generator=g), k_mn=torch.randn(1, H_kv, cap // G, D, generator=g),
            k_res=torch.randn(1, H_kv, R, D, generator=g),
            v_codes=torch.randint(0, 256, (1, H_kv, cap, D // per), generator=g, dtype=torch.uint8),
            v_scale=torch.rand(1, H_kv, cap, D // G, generator=g), v_mn=torch.randn(1, H_kv, cap, D // G, generator=g),
            v_res=torch.randn(1, H_kv, R, D, generator=g), pos=torch.tensor([pos]), bits=bits, group=G)
        if S < 0:  # the ranges as e4m3 bytes of per-head superscales
            S = -S
            for side in "kv":
                sup = torch.rand(1, H_kv, generator=g) + 0.01
                args[f"{side}_sup"] = sup
                args[f"{side}_scale"], args[f"{side}_mn"] = (e4m3.encode(args[f"{side}_{r}"], sup) for r in ("scale", "mn"))
        if S:  # S held tokens per head at random positions
            at = torch.rand(1, H_kv, pos + 1, generator=g).topk(S, dim=-1).indices
            args.update(k_held=4 * torch.randn(1, H_kv, S, D, generator=g), v_held=torch.randn(1, H_kv, S, D, generator=g),
                        held_mask=pack_mask(torch.zeros(1, H_kv, cap, dtype=torch.bool).scatter_(2, at, True)))
        q = torch.randn(1, H, 1, D, generator=g)
        ref, fast = quant_decode_attention_ref(q, **args), quant_decode_attention_torch(q, **args)
        assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max(), (bits, G, (fast - ref).abs().max())


if __name__ == "__main__":
    sys.exit(1 if run_triton_cases() else 0)
