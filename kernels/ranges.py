"""A group's quantization range, for kernels/pack.py's quantize functions: the codes of a group
given its range, and how the range is chosen (min/max, clipping, 8-bit rounding), in torch (what
the references use) and in Triton (what both quantize kernels call), computed alike.

Clipping (`clip=True`): min/max spends the levels on the group's extremes. For a bell-shaped group
that is a poor use of them: 64 Gaussian values span about +-2.4 sigma, so 1-bit min/max puts its two
levels at +-2.4 sigma while the squared-error optimum is +-0.8 sigma (error ~5 sigma^2 vs 0.36), and
2-bit min/max has a step of 1.6 sigma where 1.0 is optimal. With clip the range is shrunk about its
middle, [mn + i/32 * (mx - mn), mx - i/32 * (mx - mn)] for i = 0 .. N_CLIP - 1 (kept fraction
1, 15/16, ..., 1/4; all exact binary fractions, so the kernels compute the same candidates), and
each group keeps the candidate with the smallest squared error of its dequantized values (the first
one on ties; i = 0 is plain min/max, so a constant group is unchanged). Values outside the range
clamp to the end codes; the format and the dequantization are unchanged. The error sums are
reduced in a different order by torch and Triton, so on a near-tie the two may pick different
candidates whose errors agree to rounding; everything else matches bit for bit.

8-bit ranges (kernels/fp8.py): given per-head superscales, `ranges` (FP8) also rounds each group's
range to the best of the 9 e4m3 byte pairs around it and returns bytes, so on a GPU the whole of
kernels/fp8.quantize_pack_fp8 is one kernel; its torch reference is kernels/fp8._round_ranges.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.e4m3 import e4m3_to_f32, e4m3_toward, f32_to_e4m3

N_CLIP = 13  # clip candidates: kept fraction of the range 1 - i/16, i < N_CLIP (down to 1/4)


# ----------------------------------------------------------------------------- torch (the references)

def step_of(span: torch.Tensor, levels: int) -> torch.Tensor:
    """The step of a range spanning `span` with `levels` steps: span / levels, correctly rounded."""
    # Tensor / tensor on purpose: torch's CUDA divide-by-a-Python-scalar multiplies by the
    # reciprocal, which is not the correctly rounded quotient the Triton kernel computes.
    return span / torch.full_like(span, levels)


def quantize_codes(xf: torch.Tensor, s: torch.Tensor, m: torch.Tensor, levels: int) -> torch.Tensor:
    """float32 codes of xf for per-element float32 scale s and min m (broadcastable)."""
    ok = s > 0  # a constant group (scale 0) gets code 0 and dequantizes to mn exactly
    q = torch.floor((xf - m) / torch.where(ok, s, torch.ones_like(s)) + 0.5).clamp(0, levels)
    return torch.where(ok, q, torch.zeros_like(q))


def clip_range(g: torch.Tensor, levels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """g (N, G) float32 groups -> (scale, mn) (N,) in `dtype`: the clip candidate with the smallest
    squared error (module docstring). Candidates are scored as stored (cast to dtype)."""
    i = torch.arange(N_CLIP, device=g.device, dtype=torch.float32)  # (C,)
    scales, mns = [], []
    # groups per chunk: ~4 MB of candidates, each of the 4 tensors alive at once (q, its error, the
    # where/clamp steps), so the search stays far below a prefill chunk's activations
    step = max(1, (1 << 20) // (N_CLIP * g.shape[1]))
    for c in range(0, g.shape[0], step):
        x = g[c:c + step]  # (n, G)
        mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)  # (n, 1)
        lo = (mn + i / 32 * (mx - mn)).to(dtype).float()  # (n, C)
        sc = step_of((mx - mn) * (1 - i / 16), levels).to(dtype).float()  # (n, C)
        q = quantize_codes(x[:, None], sc[..., None], lo[..., None], levels)  # (n, C, G)
        sse = (q * sc[..., None] + lo[..., None] - x[:, None]).square().sum(-1)  # (n, C)
        best = sse.argmin(-1, keepdim=True)  # (n, 1): the first minimum
        scales.append(sc.gather(1, best)[:, 0])
        mns.append(lo.gather(1, best)[:, 0])
    return torch.cat(scales).to(dtype), torch.cat(mns).to(dtype)


# ----------------------------------------------------------------------------- Triton

@triton.jit
def group_codes(x, mn, scale, LEVELS: tl.constexpr):
    """float32 x, mn, scale (broadcastable) -> int32 codes, exactly as in quantize_pack_ref."""
    ok = scale > 0
    # div_rn: correctly rounded division; plain `/` may lower to an approximate divide on GPUs.
    y = tl.math.div_rn(x - mn, tl.where(ok, scale, 1.0))
    q = tl.minimum(tl.maximum(tl.floor(y + 0.5), 0.0), LEVELS)
    return tl.where(ok, q, 0.0).to(tl.int32)


@triton.jit
def clip_candidate(mn, mx, I: tl.constexpr, LEVELS: tl.constexpr):
    """float32 (low end, step) of clip candidate I for a group's min/max, as in clip_range (before
    the cast to the stored dtype)."""
    return mn + (I / 32) * (mx - mn), tl.math.div_rn((mx - mn) * (1 - I / 16), tl.zeros_like(mx) + LEVELS)


@triton.jit
def sq_err(x, lo, sc, LEVELS: tl.constexpr):
    """Per-element squared error of float32 x quantized with float32 low end lo and step sc."""
    d = group_codes(x, lo, sc, LEVELS).to(tl.float32) * sc + lo - x
    return d * d


@triton.jit
def group_sse(x, keep, lo, sc, LEVELS: tl.constexpr, TOKEN: tl.constexpr):
    """Squared error of each group of float32 x quantized with its float32 (lo, sc). TOKEN: x is
    (BT, BB, PER), keep selects one group along D, lo/sc/result are (BT,); else x is (BG, BB, PER)
    with each channel's group along axis 0 (keep: its real tokens), lo/sc/result (BB, PER)."""
    # (if/else, not an early return: compiled, the code after a constexpr if's return still runs)
    if TOKEN:
        err = sq_err(x, lo[:, None, None], sc[:, None, None], LEVELS)
        sse = tl.sum(tl.sum(tl.where(keep, err, 0.0), axis=2), axis=1)
    else:
        err = sq_err(x, lo[None, :, :], sc[None, :, :], LEVELS)
        sse = tl.sum(tl.where(keep, err, 0.0), axis=0)
    return sse


@triton.jit
def ranges(x, keep, mn, mx, sup, x_ptr, LEVELS: tl.constexpr, CLIP: tl.constexpr, N_CLIP: tl.constexpr,
           FP8: tl.constexpr, TOKEN: tl.constexpr):
    """The groups' ranges from their float32 min/max, as the references compute them: min/max, or
    with CLIP the candidate of smallest squared error (scored as stored, in x's dtype); then with
    FP8 the best of the 3 x 3 e4m3 byte pairs around that range (kernels/fp8.py; sup: the
    superscale, shaped like mn). The first minimum wins ties, as torch's argmin. -> (scale, mn)
    to store (x's dtype, or uint8 bytes with FP8) and the float32 (step, low end) the codes use."""
    ty = x_ptr.dtype.element_ty
    sc, lo = tl.math.div_rn(mx - mn, tl.zeros_like(mx) + LEVELS).to(ty), mn.to(ty)
    if CLIP:
        best = tl.zeros_like(mn) + float("inf")
        for i in tl.static_range(N_CLIP):
            c_lo, c_sc = clip_candidate(mn, mx, i, LEVELS)
            c_lo, c_sc = c_lo.to(ty), c_sc.to(ty)
            sse = group_sse(x, keep, c_lo.to(tl.float32), c_sc.to(tl.float32), LEVELS, TOKEN)
            better = sse < best
            best = tl.where(better, sse, best)
            sc, lo = tl.where(better, c_sc, sc), tl.where(better, c_lo, lo)
    if FP8:
        # in e4m3 units of the superscale, saturated, as kernels/e4m3.neighbours
        ys = tl.minimum(tl.maximum(tl.math.div_rn(sc.to(tl.float32), sup), -448.0), 448.0)
        ym = tl.minimum(tl.maximum(tl.math.div_rn(lo.to(tl.float32), sup), -448.0), 448.0)
        bs, bm = f32_to_e4m3(ys), f32_to_e4m3(ym)
        best = tl.zeros_like(mn) + float("inf")
        b_s, b_m = bs, bm
        for i in tl.static_range(9):  # i = 3 * (mn direction) + (scale direction), as the reference
            c_s, c_m = e4m3_toward(ys, bs, i % 3), e4m3_toward(ym, bm, i // 3)
            sse = group_sse(x, keep, e4m3_to_f32(c_m) * sup, e4m3_to_f32(c_s) * sup, LEVELS, TOKEN)
            better = sse < best
            best = tl.where(better, sse, best)
            b_s, b_m = tl.where(better, c_s, b_s), tl.where(better, c_m, b_m)
        st_sc, st_mn, sc32, lo32 = b_s.to(tl.uint8), b_m.to(tl.uint8), e4m3_to_f32(b_s) * sup, e4m3_to_f32(b_m) * sup
    else:
        st_sc, st_mn, sc32, lo32 = sc, lo, sc.to(tl.float32), lo.to(tl.float32)
    return st_sc, st_mn, sc32, lo32
