"""Decode attention over a KIVI-style quantized KV cache, dequantizing on the fly.

Layout (one layer; b bits, per = 8 // b codes per byte, packed along head_dim: element d of a token
is byte d // per, bits [(d % per) * b, (d % per) * b + b)); dequantized value = code * scale + mn:

    keys   (per channel): k_codes (B, H_kv, T_cap, D/per), k_scale/k_mn (B, H_kv, T_cap/G, D)
           tokens [0, n_kq) quantized (row t // G), [n_kq, length) in k_res (B, H_kv, R, D) at t - n_kq
    values (per token):   v_codes (B, H_kv, T_cap, D/per), v_scale/v_mn (B, H_kv, T_cap, D/G)
           tokens [0, n_vq) quantized (column d // G), [n_vq, length) in the ring v_res at t % R

n_kq and n_vq differ (keys leave the residual a block at a time, values one at a time), so each
token's K and V sources are chosen independently. Both follow from the position `pos` of the newest
token alone, because the cache (engine/kv/quant.py) moves tokens on a fixed schedule: with R the
residual / ring size, length = pos + 1, n_kq = pos - pos % R (whole blocks of R keys are packed; the
block holding pos is still in full precision) and n_vq = max(0, pos + 1 - R) (the ring holds the
last R values). E.g. R = 128, pos = 300: keys 0..255 packed, 256..300 in k_res rows 0..44; values
0..172 packed, 173..300 in the ring. So the kernel takes `pos` as a (1,) device tensor and reads
it on the device: the same launch serves every step, which is what a CUDA graph replays.

Held tokens (optional k_held, v_held (B, H_kv, S, D) and held_mask (B, H_kv, >= ceil(length / 8))
uint8): S tokens per KV head kept in full precision beside the store (the attention sinks and the
heavy hitters, engine/kv/quant.py). Bit t % 8 of byte t // 8 of a head's mask is set when token t is
held: the store and the windows still have an entry for it, which gets no weight. Every path treats
the held rows as one more slice of the softmax; attention does not depend on the order of its
tokens, so the rows need no positions. E.g. S = 2 held tokens 0 and 9, length 12: mask bytes
[0b00000001, 0b00000010]; tokens 1..8, 10, 11 come from the store and windows, 0 and 9 from the rows.

quant_decode_attention_ref is the specification: dequantize everything, then dense attention.
quant_decode_attention_torch is the CPU path: it never builds dequantized keys; codes are unpacked
with a 256-entry lookup table and the scale/min are folded into the query (keys) and into the
attention weights (values), so each side costs one table gather and one batched matmul.
quant_decode_attention_triton never materialises dequantized K/V: each program loads packed tiles,
dequantizes them in registers and runs flash-decoding (online softmax over a slice of the tokens)
for all query heads of one KV head; a small torch step merges the slices.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import use_triton
from kernels.e4m3 import decode, e4m3_to_f32

# Split policy: aim for this many (batch, kv head, split) programs, enough for ~4 per SM on an H100
# (132 SMs; at <= 128 registers a thread 4 programs of 4 warps fit one SM, and a memory-bound loop
# wants as many loads in flight as it can get), as the FullKV kernel does, but give each split at
# least MIN_SPLIT_TOKENS so the partial results stay small. Not yet timed against 256 or 1024
# (tools/kernel_timing.py does).
TARGET_PROGRAMS = 512
MIN_SPLIT_TOKENS = 512


def quant_decode_attention(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, pos,
                           bits, group, sm_scale=None, k_held=None, v_held=None, held_mask=None,
                           k_sup=None, v_sup=None) -> torch.Tensor:
    """q (B, H, 1, D) -> out (B, H, 1, D) in q.dtype: softmax(q K^T * sm_scale) V over the pos + 1
    cached tokens (sm_scale default 1/sqrt(D)), those marked in held_mask from the held rows.
    k_sup / v_sup (B, H_kv) float32: the scales and mins are 8-bit e4m3 bytes of these superscales
    (kernels/fp8.py). Triton on CUDA tensors, the torch path elsewhere."""
    fn = quant_decode_attention_triton if use_triton(q) else quant_decode_attention_torch
    return fn(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, pos, bits, group, sm_scale,
              k_held=k_held, v_held=v_held, held_mask=held_mask, k_sup=k_sup, v_sup=v_sup)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool (..., T) -> uint8 (..., ceil(T / 8)): bit t % 8 of byte t // 8 is mask[..., t], the layout
    of 1-bit codes (unpack_codes(packed, 1) reads it back)."""
    T = mask.shape[-1]
    bits = F.pad(mask.to(torch.uint8), (0, -T % 8)).unflatten(-1, (-1, 8))  # (..., ceil(T/8), 8)
    return (bits << torch.arange(8, device=mask.device, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, length: int) -> torch.Tensor:
    """uint8 (..., >= ceil(length / 8)) -> bool (..., length), the inverse of pack_mask."""
    return unpack_codes(packed[..., :-(-length // 8)], 1)[..., :length] == 1


def token_ranges(pos: torch.Tensor | int, R: int) -> tuple[int, int, int]:
    """(length, n_kq, n_vq) on the host for the newest token at `pos` (see the module docstring)."""
    p = int(pos.reshape(-1)[0]) if torch.is_tensor(pos) else int(pos)
    return p + 1, p - p % R, max(0, p + 1 - R)


# -- torch path (CPU) ---------------------------------------------------------------------------------
def _unpack_lut(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (..., D // per) -> float32 codes (..., D) through a (256, per) table: one gather
    instead of a shift, mask and cast per element."""
    per = 8 // bits
    byte = torch.arange(256, device=codes.device, dtype=torch.int32)[:, None]
    table = ((byte >> (torch.arange(per, device=codes.device, dtype=torch.int32) * bits)) & ((1 << bits) - 1)).float()
    return table[codes.long()].flatten(-2)


def _widen(ranges: torch.Tensor, sup: torch.Tensor | None) -> torch.Tensor:
    """Scales or mins as float32: stored floats as they are, 8-bit bytes through their superscale."""
    return ranges.float() if sup is None else decode(ranges, sup)


def quant_decode_attention_torch(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, pos,
                                 bits, group, sm_scale=None, k_held=None, v_held=None, held_mask=None,
                                 k_sup=None, v_sup=None) -> torch.Tensor:
    length, n_kq, n_vq = token_ranges(pos, v_res.shape[2])  # on the host: this path is for CPU tensors
    S = _check(q, k_codes, k_scale, k_res, n_kq, v_codes, v_scale, v_res, n_vq, length, bits, group,
               k_held, v_held, held_mask, k_sup, v_sup)
    B, H, _, D = q.shape
    H_kv, R, G = k_res.shape[1], v_res.shape[2], group
    n_rep = H // H_kv
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    qg = q.reshape(B, H_kv, n_rep, D).float()
    # Keys: q . (c * s + m) = c . (q * s) + q . m, with (s, m) shared by each group of G tokens.
    ng = n_kq // G
    kc = _unpack_lut(k_codes[:, :, :n_kq], bits).view(B, H_kv, ng, G, D)
    qs = qg[:, :, None] * _widen(k_scale[:, :, :ng], k_sup)[:, :, :, None]  # (B, H_kv, ng, n_rep, D)
    s_q = torch.matmul(kc, qs.transpose(-1, -2))  # (B, H_kv, ng, G, n_rep)
    s_q = s_q + torch.matmul(_widen(k_mn[:, :, :ng], k_sup)[:, :, :, None], qg.transpose(-1, -2)[:, :, None])  # + q.m
    s_q = s_q.reshape(B, H_kv, n_kq, n_rep).transpose(-1, -2)  # (B, H_kv, n_rep, n_kq)
    s_r = torch.matmul(qg, k_res[:, :, :length - n_kq].float().transpose(-1, -2))  # (B, H_kv, n_rep, r)
    s = torch.cat([s_q, s_r], dim=-1)  # (B, H_kv, n_rep, length)
    if S:  # held tokens: their store entries drop out, their exact rows join as S more scores
        s = s.masked_fill(unpack_mask(held_mask, length)[:, :, None], float("-inf"))
        s = torch.cat([s, torch.matmul(qg, k_held.float().transpose(-1, -2))], dim=-1)
    p = torch.softmax(s * sm_scale, dim=-1)  # (B, H_kv, n_rep, length + S)
    p, p_held = p[..., :length], p[..., length:]
    # Values: sum_t p_t (c * s + m) = sum_t (p_t s_t) c_t + sum_t p_t m_t, per group of G channels.
    gv = D // G
    vc = _unpack_lut(v_codes[:, :, :n_vq], bits).view(B, H_kv, n_vq, gv, G).transpose(2, 3)  # (B,H_kv,gv,n_vq,G)
    w = p[..., :n_vq, None] * _widen(v_scale[:, :, :n_vq], v_sup)[:, :, None]  # (B, H_kv, n_rep, n_vq, gv)
    out = torch.matmul(w.permute(0, 1, 4, 2, 3), vc)  # (B, H_kv, gv, n_rep, G)
    out = out.permute(0, 1, 3, 2, 4).reshape(B, H_kv, n_rep, D)
    out = out + torch.matmul(p[..., :n_vq], _widen(v_mn[:, :, :n_vq], v_sup)).repeat_interleave(G, dim=-1)
    slots = torch.arange(n_vq, length, device=q.device) % R  # ring slots, oldest first
    out = out + torch.matmul(p[..., n_vq:], v_res[:, :, slots].float())
    if S:
        out = out + torch.matmul(p_held, v_held.float())
    return out.reshape(B, H, 1, D).to(q.dtype)


# -- reference ----------------------------------------------------------------------------------------
def _check(q, k_codes, k_scale, k_res, n_kq, v_codes, v_scale, v_res, n_vq, length, bits, group,
           k_held=None, v_held=None, held_mask=None, k_sup=None, v_sup=None) -> int:
    """Assert the cache is consistent with the format; return the number of held tokens per head."""
    B, H, Tq, D = q.shape
    H_kv, R = k_res.shape[1], v_res.shape[2]
    per = 8 // bits
    assert bits in (1, 2, 4) and Tq == 1 and H % H_kv == 0, (bits, q.shape, k_res.shape)
    assert k_codes.shape[-1] * per == D and v_codes.shape[-1] * per == D, "codes are packed along D"
    assert k_scale.shape[-2] == k_codes.shape[-2] // group and v_scale.shape[-1] == D // group
    assert n_kq % group == 0 and 0 <= n_kq <= length and 0 <= n_vq <= length
    assert length - n_kq <= k_res.shape[2] and length - n_vq <= R and length >= 1
    assert n_kq <= k_codes.shape[2] and n_vq <= v_codes.shape[2]
    for ranges, sup in ((k_scale, k_sup), (v_scale, v_sup)):  # 8-bit ranges come with their superscales
        assert (ranges.dtype == torch.uint8) == (sup is not None), "uint8 ranges need a superscale"
        assert sup is None or sup.shape == (B, H_kv), (None if sup is None else sup.shape)
    if k_held is None:
        assert v_held is None and held_mask is None
        return 0
    S = k_held.shape[2]
    assert k_held.shape == v_held.shape == (B, H_kv, S, D) and S <= length
    assert held_mask.dtype == torch.uint8 and held_mask.shape[:2] == (B, H_kv) and held_mask.shape[2] * 8 >= length
    return S


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (..., D // per) -> int32 codes (..., D); code d sits in byte d // per at bit (d % per) * bits."""
    per = 8 // bits
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits  # (per,)
    vals = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., D // per, per)
    return vals.flatten(-2)


def quant_decode_attention_ref(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, pos,
                               bits, group, sm_scale=None, k_held=None, v_held=None, held_mask=None,
                               k_sup=None, v_sup=None) -> torch.Tensor:
    length, n_kq, n_vq = token_ranges(pos, v_res.shape[2])
    S = _check(q, k_codes, k_scale, k_res, n_kq, v_codes, v_scale, v_res, n_vq, length, bits, group,
               k_held, v_held, held_mask, k_sup, v_sup)
    B, H, _, D = q.shape
    H_kv, R, G = k_res.shape[1], v_res.shape[2], group
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    # Keys: one (scale, mn) row per G tokens, shared by every channel of that row.
    k_q = unpack_codes(k_codes[:, :, :n_kq], bits).float()  # (B, H_kv, n_kq, D)
    k_q = k_q * _widen(k_scale[:, :, :n_kq // G], k_sup).repeat_interleave(G, dim=2) \
        + _widen(k_mn[:, :, :n_kq // G], k_sup).repeat_interleave(G, dim=2)
    k = torch.cat([k_q.to(k_res.dtype), k_res[:, :, :length - n_kq]], dim=2)  # (B, H_kv, length, D)
    # Values: one (scale, mn) per G channels of each token.
    v_q = unpack_codes(v_codes[:, :, :n_vq], bits).float()  # (B, H_kv, n_vq, D)
    v_q = v_q * _widen(v_scale[:, :, :n_vq], v_sup).repeat_interleave(G, dim=3) \
        + _widen(v_mn[:, :, :n_vq], v_sup).repeat_interleave(G, dim=3)
    slots = torch.arange(n_vq, length, device=q.device) % R  # ring slots of the recent tokens, oldest first
    v = torch.cat([v_q.to(v_res.dtype), v_res[:, :, slots]], dim=2)  # (B, H_kv, length, D)
    # Dense grouped-query attention (as kernels.dense_attn.decode_attention, with sm_scale).
    qg = q.reshape(B, H_kv, H // H_kv, D)  # (B, H_kv, n_rep, D)
    scores = torch.matmul(qg, k.to(q.dtype).transpose(-1, -2)).float() * sm_scale  # (B, H_kv, n_rep, length)
    if S:  # held tokens: out of the store, in from their full-precision rows
        scores = scores.masked_fill(unpack_mask(held_mask, length)[:, :, None], float("-inf"))
        scores = torch.cat([scores, torch.matmul(qg, k_held.to(q.dtype).transpose(-1, -2)).float() * sm_scale], -1)
        v = torch.cat([v, v_held], dim=2)  # (B, H_kv, length + S, D)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # (B, H_kv, n_rep, D)
    return out.reshape(B, H, 1, D).to(q.dtype)


# -- Triton ----------------------------------------------------------------------------------------------
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
    Q, KC, KS, KM, KR, VC, VS, VM, VR, HM, KSUP, VSUP, M_out, L_out, Acc_out,
    sm_scale, POS, n_rep, H_kv, R, split_len,
    sq_b, sq_h, sq_d,
    skc_b, skc_h, skc_t, sks_b, sks_h, sks_t, skm_b, skm_h, skm_t, skr_b, skr_h, skr_t,
    svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, svm_b, svm_h, svm_t, svr_b, svr_h, svr_t, shm_b, shm_h,
    HAS_HELD: tl.constexpr, FP8: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NREP_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program = one (batch, KV head) and one split of the tokens, for all n_rep query heads of
    the group: every K/V tile is read and dequantized once and used by the whole group. The cache
    tensors' innermost stride is 1 (the wrapper checks): rows are loaded as contiguous runs."""
    PER: tl.constexpr = 8 // BITS
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    b, hk = (pid_bh // H_kv).to(tl.int64), (pid_bh % H_kv).to(tl.int64)  # int64: big caches overflow int32
    r = tl.arange(0, NREP_PAD)  # query heads of the group, padded so tl.dot has M >= 16
    d, nb = tl.arange(0, D), tl.arange(0, D // PER)  # channels; packed bytes of a row
    q = tl.load(Q + b * sq_b + (hk * n_rep + r[:, None]) * sq_h + d[None, :] * sq_d,
                mask=r[:, None] < n_rep, other=0.0)  # (NREP_PAD, D)
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
        # Held tokens are attended from their rows, merged after: their store entries (finite: the
        # store is written whole at prefill) are loaded like the rest and only their scores masked.
        # Masking the loads as well made every load mask data-dependent: 127 -> 247 registers.
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

        # "ieee" keeps fp32 caches exact on GPUs (the default would be tf32); fp16/bf16 ignore it.
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * sm_scale  # (NREP_PAD, BLOCK_T)
        s = tl.where(attend[None, :], s, float("-inf"))  # exp(-inf) = 0: no weight on v either
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing live yet: avoid -inf - -inf
        alpha = tl.exp(m - m_ref)  # rescales what was summed under the old max (0 on the first block)
        p = tl.exp(s - m_ref[:, None])  # (NREP_PAD, BLOCK_T)
        l = l * alpha + tl.sum(p, axis=1)

        # V tile (BLOCK_T, D): packed codes for t < n_vq, the ring slot t % R after; each range of
        # a row's D // G groups is spread over the group's G channels.
        v_quant, v_full = live & (t < n_vq), live & (t >= n_vq)
        byte = tl.load(vc + t[:, None] * svc_t + nb[None, :], mask=v_quant[:, None], other=0)
        scale = tl.reshape(tl.broadcast_to(v_scale[:, :, None], (BLOCK_T, D // G, G)), (BLOCK_T, D))
        mn = tl.reshape(tl.broadcast_to(v_mn[:, :, None], (BLOCK_T, D // G, G)), (BLOCK_T, D))
        if FP8:
            scale, mn = e4m3_to_f32(scale) * vsup, e4m3_to_f32(mn) * vsup
        v_res = tl.load(vr + (t[:, None] % R) * svr_t + d[None, :], mask=v_full[:, None], other=0.0)
        v = tl.where(v_quant[:, None], _codes(byte, BITS, BLOCK_T, D // PER).to(tl.float32) * scale.to(tl.float32)
                     + mn.to(tl.float32), v_res.to(tl.float32))  # (BLOCK_T, D)

        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
        m = m_new
        held, k_scale, k_mn, v_scale, v_mn = nxt

    # Partial results of this split, unnormalised (m = -inf for a split past the length: weight 0
    # in the merge); rows past n_rep are padding and not stored.
    row = pid_bh * tl.num_programs(1) + pid_s  # index into (B * H_kv, n_splits)
    keep = r < n_rep
    tl.store(M_out + row * n_rep + r, m, mask=keep)
    tl.store(L_out + row * n_rep + r, l, mask=keep)
    tl.store(Acc_out + (row * n_rep + r[:, None]) * D + d[None, :], acc, mask=keep[:, None])


def quant_decode_attention_triton(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, pos,
                                  bits, group, sm_scale=None, k_held=None, v_held=None, held_mask=None,
                                  k_sup=None, v_sup=None, *, n_splits=None, block_t=None):
    """Fused dequantize + flash-decoding. Every launch parameter depends only on the shapes (the grid
    covers the capacity), so the call can be captured in a CUDA graph. n_splits / block_t override
    the defaults (tests use them to exercise several splits on short sequences)."""
    B, H, _, D = q.shape
    H_kv, R = k_res.shape[1], v_res.shape[2]
    n_rep = H // H_kv
    capacity = v_codes.shape[2] + R  # values: packed rows + the ring (see engine/kv/quant.py)
    # A block holds several (BLOCK_T, D) tiles at once (codes, ranges, residual, result). Compiled
    # for sm_90 with 4 warps as a launch specializes it (tools/kernel_resources.py; triton 3.6 and
    # 3.9), every variant (bits, 8-bit ranges, held rows) at D = 128 takes at most 167 registers at
    # BLOCK_T 16 (3 programs per SM, 28 KB of shared memory each for the pipelined loads) and 182 at
    # 32 (2-3), no spills; 64 takes 255 and spills a little. 16 is the default until
    # tools/kernel_timing.py times them.
    block_t = block_t or 16
    assert D >= 16 and D & (D - 1) == 0 and block_t >= 16, "tl.arange/tl.dot need powers of two >= 16"
    assert bits in (1, 2, 4) and k_codes.shape[-1] * (8 // bits) == D and H % H_kv == 0
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    rows = (k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res)
    assert max(x.stride(2) for x in rows) * capacity < 2 ** 31, "token offsets within a head are int32"
    assert all(x.stride(3) == 1 for x in rows), "the kernel loads each row as one contiguous run"

    if n_splits is None:
        n_splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, B * H_kv), triton.cdiv(capacity, MIN_SPLIT_TOKENS)))
    split_len = triton.cdiv(triton.cdiv(capacity, n_splits), block_t) * block_t  # whole blocks per split
    n_splits = triton.cdiv(capacity, split_len)
    part = dict(device=q.device, dtype=torch.float32)
    m = torch.empty(B * H_kv, n_splits, n_rep, **part)
    l = torch.empty(B * H_kv, n_splits, n_rep, **part)  # noqa: E741
    acc = torch.empty(B * H_kv, n_splits, n_rep, D, **part)
    grid = (B * H_kv, n_splits)
    has_held = k_held is not None
    hm = held_mask if has_held else v_codes  # any uint8 tensor: not read without held tokens
    fp8_ranges = k_sup is not None
    assert fp8_ranges == (v_sup is not None) == (k_scale.dtype == torch.uint8) == (v_scale.dtype == torch.uint8)
    ksup, vsup = (k_sup.contiguous(), v_sup.contiguous()) if fp8_ranges else (m, m)  # (B, H_kv); m: unread
    _quant_decode_kernel[grid](
        q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, hm, ksup, vsup, m, l, acc,
        sm_scale, pos, n_rep, H_kv, R, split_len,
        q.stride(0), q.stride(1), q.stride(3),
        *(st for x in rows for st in x.stride()[:3]), hm.stride(0), hm.stride(1),  # (b, h, t) strides
        HAS_HELD=has_held, FP8=fp8_ranges, BITS=bits, G=group, D=D, NREP_PAD=max(16, triton.next_power_of_2(n_rep)), BLOCK_T=block_t,
        num_warps=4,
    )
    if has_held:  # the held rows are one more split, attended densely here
        S = k_held.shape[2]
        assert held_mask.stride(-1) == 1, "the kernel reads the mask's bytes contiguously"
        qg = q.reshape(B * H_kv, n_rep, D).float()
        s = torch.matmul(qg, k_held.reshape(B * H_kv, S, D).float().transpose(-1, -2)) * sm_scale  # (BH, n_rep, S)
        m_s = s.amax(dim=-1)  # (B * H_kv, n_rep)
        p = torch.exp(s - m_s[..., None])
        m, l = torch.cat([m, m_s[:, None]], dim=1), torch.cat([l, p.sum(dim=-1)[:, None]], dim=1)  # noqa: E741
        acc = torch.cat([acc, torch.matmul(p, v_held.reshape(B * H_kv, S, D).float())[:, None]], dim=1)
    # Merge the splits: rescale each one's sums to the global max, then normalise once.
    w = torch.exp(m - m.amax(dim=1, keepdim=True))  # (B * H_kv, n_splits, n_rep)
    out = (acc * w[..., None]).sum(dim=1) / (l * w).sum(dim=1)[..., None]  # (B * H_kv, n_rep, D)
    return out.reshape(B, H, 1, D).to(q.dtype)
