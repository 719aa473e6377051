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
quant_decode_attention_torch is the CPU path: it never builds dequantized K/V; the scale/min are
folded into the query (keys) and into the attention weights (values), and the codes are read as
`per` *fields* rather than unpacked: field i of a byte (a shift and a mask of the whole tensor)
holds channels i, i + per, i + 2 per, ..., so the matching columns of the query (or of the output)
meet it in one batched matmul per field, and no interleaved (tokens, D) float copy is ever made.
Worked example, 4 bits (per = 2), D = 4: a token's bytes [0x21, 0x43] hold channels (1, 2, 3, 4);
field 0 = (1, 3) = channels 0 and 2, field 1 = (2, 4) = channels 1 and 3, and
q . k = q[0::2] . (1, 3) + q[1::2] . (2, 4). On 2 CPU threads at 4k tokens (SmolLM2-135M's
3 KV heads, 2026-11-30) one layer's call takes 1.3 ms at 4 bits and 2.0 at 2, against 4.3 and
3.4 with the 256-entry lookup table that unpacked every byte into its codes before (indexing a
table by a byte tensor is a slow gather on the CPU); bench.py's 4-bit decode at 4k went from 167
to 80 ms/token (docs/RESULTS.md, "Today's code at 4k").
quant_decode_attention_triton (kernels/quant_attn_triton.py) never materialises dequantized K/V:
each program loads packed tiles, dequantizes them in registers and runs flash-decoding (online
softmax over a slice of the tokens) for all query heads of one KV head; a small merge kernel
(kernels/splits.py) combines the slices.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.dense_attn import runs_triton
from kernels.e4m3 import decode
from kernels.quant_attn_triton import quant_decode_attention_triton

# On a GPU the kernel rotates the query and the output itself (two fewer kernels per layer and step);
# False: two torch matmuls around it instead, as on the CPU (a switch for a GPU that shows a problem
# with the in-kernel rotation before it is fixed).
ROTATE_IN_KERNEL = True


def quant_decode_attention(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, pos,
                           bits, group, sm_scale=None, k_held=None, v_held=None, held_mask=None,
                           k_sup=None, v_sup=None, rot=None, rotate="none") -> torch.Tensor:
    """q (B, H, 1, D) -> out (B, H, 1, D) in q.dtype: softmax(q K^T * sm_scale) V over the pos + 1
    cached tokens (sm_scale default 1/sqrt(D)), those marked in held_mask from the held rows.
    k_sup / v_sup (B, H_kv) float32: the scales and mins are 8-bit e4m3 bytes of these superscales
    (kernels/fp8.py). rot (D, D): the cache holds k R and v R ("kv") or v R ("v"), so the query is
    q R and the output comes back by R^T (engine/kv/quant.py); the caller passes q and gets the
    output as if nothing were rotated. Triton on CUDA tensors (the rotations inside the kernel),
    the torch path elsewhere and for a head_dim the kernel cannot tile (not a power of two >= 16,
    e.g. 100: such models decode eagerly, engine/graphs.py)."""
    triton_ok = runs_triton(q, q.shape[-1])
    if triton_ok and ROTATE_IN_KERNEL:
        return quant_decode_attention_triton(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, pos,
                                             bits, group, sm_scale, k_held, v_held, held_mask, k_sup, v_sup,
                                             rot, rotate)
    fn = quant_decode_attention_triton if triton_ok else quant_decode_attention_torch
    if rotate == "kv":
        q = q @ rot  # (qR).(kR) = q.k
    out = fn(q, k_codes, k_scale, k_mn, k_res, v_codes, v_scale, v_mn, v_res, pos, bits, group, sm_scale,
             k_held=k_held, v_held=v_held, held_mask=held_mask, k_sup=k_sup, v_sup=v_sup)
    return out if rotate == "none" else out @ rot.T  # sum p (vR) = (sum p v) R


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
def _fields(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """uint8 (..., D // per) -> per float32 tensors (..., D // per): field i holds the codes of
    channels i, i + per, i + 2 per, ... (channel d is bits [(d % per) * b, ...) of byte d // per)."""
    mask = (1 << bits) - 1
    return [((codes >> (i * bits)) & mask).float() for i in range(8 // bits)]


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
    per = 8 // bits
    # Keys: q . (c * s + m) = c . (q * s) + q . m, with (s, m) shared by each group of G tokens;
    # c . (q * s) summed field by field, each field against its channels' columns of q * s.
    ng = n_kq // G
    qs = qg[:, :, None] * _widen(k_scale[:, :, :ng], k_sup)[:, :, :, None]  # (B, H_kv, ng, n_rep, D)
    # (B, H_kv, ng, per, D / per, n_rep): field i's columns, contiguous (a strided slice would send
    # the batched matmul down a per-batch loop: the whole call took 2.2 ms at 4k tokens, not 1.2)
    qs = qs.view(B, H_kv, ng, n_rep, D // per, per).permute(0, 1, 2, 5, 4, 3).contiguous()
    s_q = torch.matmul(_widen(k_mn[:, :, :ng], k_sup)[:, :, :, None], qg.transpose(-1, -2)[:, :, None])  # q.m
    for i, c in enumerate(_fields(k_codes[:, :, :n_kq], bits)):  # c (B, H_kv, n_kq, D / per)
        s_q = s_q + torch.matmul(c.view(B, H_kv, ng, G, D // per), qs[:, :, :, i])  # (B, H_kv, ng, G, n_rep)
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
    w = p[..., :n_vq, None] * _widen(v_scale[:, :, :n_vq], v_sup)[:, :, None]  # (B, H_kv, n_rep, n_vq, gv)
    w = w.permute(0, 1, 4, 2, 3).contiguous()  # (B, H_kv, gv, n_rep, n_vq)
    fields = _fields(v_codes[:, :, :n_vq], bits)  # per x (B, H_kv, n_vq, D / per)
    if G % per == 0:  # group g's channels are columns [g G / per, (g + 1) G / per) of every field
        Gp = G // per
        parts = [[torch.matmul(w[:, :, g], c[..., g * Gp:(g + 1) * Gp]) for c in fields]  # (B, H_kv, n_rep, Gp)
                 for g in range(gv)]
        out = torch.stack([torch.stack(row, dim=-1) for row in parts], dim=3)  # (B, H_kv, n_rep, gv, Gp, per)
    else:  # groups narrower than a byte's codes (e.g. G 4 at 1 bit): interleave the fields first
        vc = torch.stack(fields, dim=-1).view(B, H_kv, n_vq, gv, G).transpose(2, 3)  # (B, H_kv, gv, n_vq, G)
        out = torch.matmul(w, vc).transpose(2, 3)  # (B, H_kv, n_rep, gv, G)
    out = out.reshape(B, H_kv, n_rep, D)  # channel d = (group, field column, field)
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
