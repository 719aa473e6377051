"""The Triton kernel of kernels/quant_attn.py (whose docstring gives the cache layout, the token
ranges that follow from the position, and the held tokens): decode attention over a KIVI-style
quantized KV cache, dequantizing in registers, never materialising dequantized K/V. Each program
loads packed tiles of one (batch, KV head) and one split of the tokens (and its share of the
held tokens' full-precision rows), dequantizes them and runs flash-decoding (online softmax) for
all query heads of the group; kernels/splits.py merges the splits. Where QuantKV stores its keys
and values rotated (engine/kv/quant.py), the kernel rotates the query itself and each split's
output back before storing it: two matmuls per layer fewer in a decode step. How its loads are laid out
so that Triton pipelines them, and what that costs in registers, is in the kernel's comments;
tools/kernel_resources.py compiles it, tools/kernel_timing.py times it, tests/test_quant_attn.py
checks it against quant_decode_attention_ref.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.e4m3 import e4m3_to_f32
from kernels.splits import (attend_block, empty_partials, merge_splits_triton, store_split, store_split_rotated,
                            tokens_per_split)

# Split policy: enough (batch, kv head, split) programs to fill the GPU in one wave, PROGRAMS_PER_SM
# on each SM at once (the kernel takes <= 168 registers a thread at BLOCK_T 16, tools/kernel_resources.py:
# 3 programs x 128 threads x 168 fit an SM's 64k registers), as a memory-bound loop wants as many
# loads in flight as it can get; but each split at least MIN_SPLIT_TOKENS so the partial results stay
# small. E.g. an H100 (132 SMs), 8 KV heads: 50 splits, 400 programs. Not yet timed against other
# counts (tools/kernel_timing.py does).
PROGRAMS_PER_SM = 3
MIN_SPLIT_TOKENS = 512


@triton.jit
def _codes(byte, BITS: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr):
    """(ROWS, NB) packed bytes -> (ROWS, NB * PER) int32 codes, code j of byte n at column n * PER + j.
    tl.join adds a minor dimension, so joining the even codes' tensor with the odd ones' puts code
    j at index j % 2 of the last dimension; nested, PER = 4 gives [j // 2][j % 2] = [c0, c1, c2, c3]
    in row-major order, which the reshape flattens. Loading whole bytes and splitting them here,
    rather than loading byte d // PER once per channel d, makes the load contiguous: wide enough
    for Triton to pipeline it (cp.async) and PER times fewer load instructions."""
    x = byte.to(tl.int32)
    if BITS == 4:
        out = tl.join(x & 15, x >> 4)
    elif BITS == 2:
        out = tl.join(tl.join(x & 3, (x >> 4) & 3), tl.join((x >> 2) & 3, x >> 6))
    else:  # 1 bit: codes 0..7 at [j // 4][(j // 2) % 2][j % 2]
        out = tl.join(tl.join(tl.join(x & 1, (x >> 4) & 1), tl.join((x >> 2) & 1, (x >> 6) & 1)),
                      tl.join(tl.join((x >> 1) & 1, (x >> 5) & 1), tl.join((x >> 3) & 1, x >> 7)))
    return tl.reshape(out, (ROWS, NB * (8 // BITS)))


@triton.jit
def _block_extras(t0, length, n_kq, n_vq, hm, ks, km, vs, vm, sks_t, skm_t, svs_t, svm_t,
                  HAS_HELD: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """The narrow loads of the block of tokens t0 .. t0 + BLOCK_T - 1: its held bits (BLOCK_T,), its
    keys' range row, scale and min (D,) each (the block lies in one key group), and its values'
    ranges (BLOCK_T, D // G) each. Masked like the tiles they go with; nothing past the length."""
    t = t0 + tl.arange(0, BLOCK_T)
    live = t < length
    if HAS_HELD:
        held = tl.load(hm + t // 8, mask=live, other=0).to(tl.int32) >> (t % 8).to(tl.int32) & 1
    else:
        held = tl.zeros([BLOCK_T], dtype=tl.int32)
    d, gi = tl.arange(0, D), tl.arange(0, D // G)
    k_row = t0 + 0 * d < n_kq  # (D,) all or nothing (a scalar test & a tensor is int32 in the interpreter)
    if G % BLOCK_T != 0:  # groups smaller than a block: the kernel loads a row per token instead
        k_row = d < 0
    k_scale = tl.load(ks + (t0 // G) * sks_t + d, mask=k_row, other=0.0)
    k_mn = tl.load(km + (t0 // G) * skm_t + d, mask=k_row, other=0.0)
    v_quant = (live & (t < n_vq))[:, None]
    v_scale = tl.load(vs + t[:, None] * svs_t + gi[None, :], mask=v_quant, other=0.0)
    v_mn = tl.load(vm + t[:, None] * svm_t + gi[None, :], mask=v_quant, other=0.0)
    return held, k_scale, k_mn, v_scale, v_mn


@triton.jit
def _quant_decode_kernel(
    Q, KC, KS, KM, KR, VC, VS, VM, VR, HM, KH, VH, KSUP, VSUP, ROT, M_out, L_out, Acc_out,
    sm_scale, POS, n_rep, H_kv, R, split_len, S, s_split,
    sq_b, sq_h, sq_d,
    skc_b, skc_h, skc_t, sks_b, sks_h, sks_t, skm_b, skm_h, skm_t, skr_b, skr_h, skr_t,
    svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, svm_b, svm_h, svm_t, svr_b, svr_h, svr_t, shm_b, shm_h,
    skh_b, skh_h, skh_t, svh_b, svh_h, svh_t,
    HAS_HELD: tl.constexpr, FP8: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NREP_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, ROT_Q: tl.constexpr, ROT_OUT: tl.constexpr, ROT_CHUNK: tl.constexpr,
):
    """One program = one (batch, KV head) and one split of the tokens, for all n_rep query heads of
    the group: every K/V tile is read and dequantized once and used by the whole group. The cache
    tensors' innermost stride is 1 (the wrapper checks): rows are loaded as contiguous runs. With
    held tokens (S of them per head, full-precision rows KH, VH), split i also attends held rows
    [i * s_split, (i + 1) * s_split): no split of its own, no launch of its own."""
    PER: tl.constexpr = 8 // BITS
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    b, hk = (pid_bh // H_kv).to(tl.int64), (pid_bh % H_kv).to(tl.int64)  # int64: big caches overflow int32
    r = tl.arange(0, NREP_PAD)  # query heads of the group, padded so tl.dot has M >= 16
    d, nb = tl.arange(0, D), tl.arange(0, D // PER)  # channels; packed bytes of a row
    q_rows = Q + b * sq_b + (hk * n_rep + r[:, None]) * sq_h  # (NREP_PAD, 1)
    if ROT_Q:  # keys are stored rotated (engine/kv/quant.py): q.k = (q R).(k R), summed over slices
        # of ROT_CHUNK input channels (a (ROT_CHUNK, D) slice of R in registers, not all of it)
        qr = tl.zeros([NREP_PAD, D], dtype=tl.float32)
        for c in tl.static_range(0, D, ROT_CHUNK):
            e = c + tl.arange(0, ROT_CHUNK)
            q_c = tl.load(q_rows + e[None, :] * sq_d, mask=r[:, None] < n_rep, other=0.0)  # (NREP_PAD, ROT_CHUNK)
            qr += tl.dot(q_c, tl.load(ROT + e[:, None] * D + d[None, :]), input_precision="ieee")
        q = qr.to(Q.dtype.element_ty)  # rounded as torch's q @ R would be
    else:
        q = tl.load(q_rows + d[None, :] * sq_d, mask=r[:, None] < n_rep, other=0.0)  # (NREP_PAD, D)
    kc = KC + b * skc_b + hk * skc_h
    ks, km = KS + b * sks_b + hk * sks_h, KM + b * skm_b + hk * skm_h
    kr = KR + b * skr_b + hk * skr_h
    vc = VC + b * svc_b + hk * svc_h
    vs, vm = VS + b * svs_b + hk * svs_h, VM + b * svm_b + hk * svm_h
    vr = VR + b * svr_b + hk * svr_h
    hm = HM + b * shm_b + hk * shm_h
    if FP8:  # 8-bit ranges: e4m3 bytes times the head's superscale (kernels/fp8.py)
        ksup, vsup = tl.load(KSUP + pid_bh), tl.load(VSUP + pid_bh)

    pos = tl.load(POS).to(tl.int32)  # the newest token; the ranges follow from it (module docstring)
    length, n_kq, n_vq = pos + 1, pos - pos % R, tl.maximum(pos + 1 - R, 0)
    m = tl.full([NREP_PAD], float("-inf"), dtype=tl.float32)  # running max of the scores
    l = tl.zeros([NREP_PAD], dtype=tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([NREP_PAD, D], dtype=tl.float32)  # running sum of exp(score - m) * v
    lo = pid_s * split_len
    # Triton pipelines the wide loads (codes, residual rows) across iterations itself, but not loads
    # under 4 bytes a thread (the held bits and the ranges), which would then stall every iteration
    # on a memory round trip: the loop issues those one block ahead by hand and carries them.
    held, k_scale, k_mn, v_scale, v_mn = _block_extras(lo, length, n_kq, n_vq, hm, ks, km, vs, vm, sks_t, skm_t,
                                                       svs_t, svm_t, HAS_HELD, G, D, BLOCK_T)
    # The grid covers the whole capacity and every split runs a fixed trip count: blocks past the
    # live length load nothing (masked) and add nothing, so no launch depends on the length.
    for start in range(0, split_len, BLOCK_T):
        # int32 token offsets within the head (the wrapper checks they fit): int64 ones doubled the
        # registers of every address tile, and the kernel spilled (ptxas, sm_90)
        t = lo + start + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        live = t < length
        # Held tokens are attended from their rows, after this loop: their store entries are loaded
        # like the rest, then their scores set to -inf and their values to 0 (selects: whatever an
        # entry holds adds nothing). Masking the loads instead made every load mask data-dependent:
        # 127 -> 247 registers.
        attend = live & (held == 0)
        nxt = _block_extras(lo + start + BLOCK_T, length, n_kq, n_vq, hm, ks, km, vs, vm, sks_t, skm_t, svs_t,
                            svm_t, HAS_HELD, G, D, BLOCK_T)

        # K tile (BLOCK_T, D): packed codes for t < n_kq, the residual block after. Both loads are
        # masked, so each token's bytes are read from exactly one of the two sources.
        k_quant, k_full = live & (t < n_kq), live & (t >= n_kq)
        byte = tl.load(kc + t[:, None] * skc_t + nb[None, :], mask=k_quant[:, None], other=0)  # (BLOCK_T, D/PER)
        if G % BLOCK_T == 0:  # the block lies in one key group: one range row for all its tokens
            scale, mn = k_scale[None, :], k_mn[None, :]
        else:  # groups smaller than a block (G < 16): a row per token, loaded here
            scale = tl.load(ks + (t[:, None] // G) * sks_t + d[None, :], mask=k_quant[:, None], other=0.0)
            mn = tl.load(km + (t[:, None] // G) * skm_t + d[None, :], mask=k_quant[:, None], other=0.0)
        if FP8:
            scale, mn = e4m3_to_f32(scale) * ksup, e4m3_to_f32(mn) * ksup
        k_res = tl.load(kr + (t[:, None] - n_kq) * skr_t + d[None, :], mask=k_full[:, None], other=0.0)
        k = tl.where(k_quant[:, None], _codes(byte, BITS, BLOCK_T, D // PER).to(tl.float32) * scale.to(tl.float32)
                     + mn.to(tl.float32), k_res.to(tl.float32))  # (BLOCK_T, D)

        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * sm_scale  # (NREP_PAD, BLOCK_T)
        s = tl.where(attend[None, :], s, float("-inf"))  # exp(-inf) = 0: no weight on v either

        # V tile (BLOCK_T, D): packed codes for t < n_vq, the ring slot t % R after; each range of
        # a row's D // G groups is spread over the group's G channels.
        v_quant, v_full = live & (t < n_vq), live & (t >= n_vq)
        byte = tl.load(vc + t[:, None] * svc_t + nb[None, :], mask=v_quant[:, None], other=0)
        scale, mn = v_scale.to(tl.float32), v_mn.to(tl.float32)  # (BLOCK_T, D // G)
        if FP8:  # decoded before they are spread over the channels: G times fewer decodes
            scale, mn = e4m3_to_f32(v_scale) * vsup, e4m3_to_f32(v_mn) * vsup
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_T, D // G, G)), (BLOCK_T, D))
        mn = tl.reshape(tl.broadcast_to(mn[:, :, None], (BLOCK_T, D // G, G)), (BLOCK_T, D))
        v_res = tl.load(vr + (t[:, None] % R) * svr_t + d[None, :], mask=v_full[:, None], other=0.0)
        v = tl.where(v_quant[:, None], _codes(byte, BITS, BLOCK_T, D // PER).to(tl.float32) * scale + mn,
                     v_res.to(tl.float32))  # (BLOCK_T, D)
        v = tl.where(attend[:, None], v, 0.0)  # a held token's entry, even inf, adds 0 (not 0 * inf)
        m, l, acc = attend_block(m, l, acc, s, v.to(q.dtype))
        held, k_scale, k_mn, v_scale, v_mn = nxt

    if HAS_HELD:  # this split's share of the held rows: more tokens of the same softmax, exact
        kh, vh = KH + b * skh_b + hk * skh_h, VH + b * svh_b + hk * svh_h
        for start in range(0, s_split, BLOCK_T):
            j = pid_s * s_split + start + tl.arange(0, BLOCK_T)
            ok = j < S
            k = tl.load(kh + j[:, None] * skh_t + d[None, :], mask=ok[:, None], other=0.0)  # (BLOCK_T, D)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * sm_scale
            v = tl.load(vh + j[:, None] * svh_t + d[None, :], mask=ok[:, None], other=0.0)
            m, l, acc = attend_block(m, l, acc, tl.where(ok[None, :], s, float("-inf")), v.to(q.dtype))

    if ROT_OUT:  # values are stored rotated: this split's output is (sum p v) R, rotated back by R^T
        store_split_rotated(M_out, L_out, Acc_out, m, l, acc, ROT, n_rep, NREP_PAD, D, ROT_CHUNK)
    else:
        store_split(M_out, L_out, Acc_out, m, l, acc, n_rep, NREP_PAD, D)


def quant_decode_attention_triton(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, pos,
                                  bits, group, sm_scale=None, k_held=None, v_held=None, held_mask=None,
                                  k_sup=None, v_sup=None, rot=None, rotate="none", *, n_splits=None, block_t=None):
    """Fused dequantize + flash-decoding. Every launch parameter depends only on the shapes (the grid
    covers the capacity), so the call can be captured in a CUDA graph. rot (D, D) with rotate "kv"
    (keys and values stored rotated by it) or "v" (values only): the query is rotated and the
    output rotated back inside the kernel, two matmuls fewer per layer. n_splits / block_t override
    the defaults (tests use them to exercise several splits on short sequences)."""
    B, H, _, D = q.shape
    H_kv, R = k_res.shape[1], v_res.shape[2]
    n_rep = H // H_kv
    capacity = v_codes.shape[2] + R  # values: packed rows + the ring (see engine/kv/quant.py)
    # A block holds several (BLOCK_T, D) tiles at once (codes, ranges, residual, result). Compiled
    # for sm_90 with 4 warps as a launch specializes it (tools/kernel_resources.py; triton 3.6 and
    # 3.9), every variant (bits, 8-bit ranges, held rows) at D = 128 took at most 168 registers at
    # BLOCK_T 16 (3 programs per SM, ~28 KB of shared memory each for the pipelined loads) and 248 at
    # 32 (2), no spills; 64 spills. With the rotations inside, triton 3.6 took up to 186 at 16 (3.9:
    # 168), so BLOCK_T 16 launches are capped at 168 (maxnreg): 8 bytes of spill at most, and 3
    # programs per SM kept. 16 is the default until tools/kernel_timing.py times them.
    block_t = block_t or 16
    assert D >= 16 and D & (D - 1) == 0 and block_t >= 16, "tl.arange/tl.dot need powers of two >= 16"
    assert bits in (1, 2, 4) and k_codes.shape[-1] * (8 // bits) == D and H % H_kv == 0
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    rows = (k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res)
    assert max(x.stride(2) for x in rows) * capacity < 2 ** 31, "token offsets within a head are int32"
    assert all(x.stride(3) == 1 or x.shape[3] == 1 for x in rows), "the kernel loads each row as one contiguous run"
    assert k_held is None or held_mask.stride(-1) == 1, "the kernel reads the mask's bytes contiguously"

    if n_splits is None:  # SMs: the device's, or an H100's where there is none (interpreted on a CPU)
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        n_splits = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, B * H_kv), triton.cdiv(capacity, MIN_SPLIT_TOKENS)))
    per_split = tokens_per_split(capacity, n_splits, block_t)
    n_splits = triton.cdiv(capacity, per_split)
    m, l, acc = empty_partials(B * H_kv, n_splits, n_rep, D, q.device)  # noqa: E741
    grid = (B * H_kv, n_splits)
    has_held = k_held is not None
    hm = held_mask if has_held else v_codes  # any uint8 tensor: not read without held tokens
    kh, vh = (k_held, v_held) if has_held else (k_res, v_res)  # not read without held tokens
    assert kh.stride(3) == 1 and vh.stride(3) == 1, "held rows are loaded as contiguous runs"
    S = k_held.shape[2] if has_held else 0
    s_split = tokens_per_split(S, n_splits, block_t)  # held rows a split
    fp8_ranges = k_sup is not None
    assert fp8_ranges == (v_sup is not None) == (k_scale.dtype == torch.uint8) == (v_scale.dtype == torch.uint8)
    ksup, vsup = (k_sup.contiguous(), v_sup.contiguous()) if fp8_ranges else (m, m)  # (B, H_kv); m: unread
    assert rotate in ("none", "v", "kv") and (rotate == "none" or (rot.shape == (D, D) and rot.is_contiguous()))
    _quant_decode_kernel[grid](
        q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, hm, kh, vh, ksup, vsup,
        m if rotate == "none" else rot, m, l, acc,
        sm_scale, pos, n_rep, H_kv, R, per_split, S, s_split,
        q.stride(0), q.stride(1), q.stride(3),
        *(st for x in rows for st in x.stride()[:3]), hm.stride(0), hm.stride(1),  # (b, h, t) strides
        *kh.stride()[:3], *vh.stride()[:3],
        HAS_HELD=has_held, FP8=fp8_ranges, BITS=bits, G=group, D=D, NREP_PAD=max(16, triton.next_power_of_2(n_rep)),
        BLOCK_T=block_t, ROT_Q=rotate == "kv", ROT_OUT=rotate != "none", ROT_CHUNK=min(32, D), num_warps=4,
        **({"maxnreg": 168} if block_t == 16 else {}),  # 3 programs per SM: the register note above
    )
    return merge_splits_triton(m, l, acc, q.dtype).reshape(B, H, 1, D)  # kernels/splits.py
