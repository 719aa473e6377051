"""Sparse attention helpers for OffloadKV: a 4-bit sketch of the prompt's keys, approximate scores
from it, and top-k selection. (The exact attention over the selected tokens is dense attention over
a contiguous device buffer, kernels.dense_attn, because OffloadKV keeps that buffer in place.)

The sketch holds, for each *chunk* of c consecutive middle-of-prompt tokens and each of C chosen key
channels, the smallest and the largest key value in the chunk (Quest's bound, on a few channels):

    score(chunk) = sum over channels of max(q_c * min_c, q_c * max_c)
                 = q+ . max + q- . min      (q+ = max(q, 0), q- = min(q, 0))

an upper bound of q[C] . k[C] for every token of the chunk. With c = 1, min = max = the token's
keys and the score is q[C] . k[C] itself; the sketch is then stored once (`lo is hi`). (Scoring a
chunk by its mean key instead, ShadowKV's landmarks, kept less attention mass at equal bytes on the
default model: 0.766 against 0.778 at chunk 8, docs/RESULTS.md. A mean hides the token the query
wants; a max does not.)

The values are stored as 4-bit codes on a grid per (KV head, channel) that spans the channel's
range over the whole middle: value = base + step * code, code in 0..15. Chunk minima are rounded
down and maxima up, so the bound stays a bound; single tokens are rounded to the nearest code.
Why 4 bits: ranking needs far less precision than attention, and more channels rank much better.
Share of the middle's attention mass that a selection of 20% of the prompt keeps, on the default
model (three 4k suite prompts, every layer and decode step; `python tools/sketch_mass.py`,
docs/RESULTS.md): exact scores 0.884; 8 channels 0.807, 16 channels 0.845 as values, 0.845 as 8-bit
codes, 0.843 as 4-bit codes; 32 channels as 4-bit codes 0.870. So for the bytes of 8 channels in
bfloat16 the sketch holds 32 channels as 4-bit codes.
Two codes share a byte: byte j holds channel j (low nibble) and channel j + ceil(C/2) (high).
Worked example, C = 4, codes (3, 7, 0, 15): bytes [3 | 0 << 4, 7 | 15 << 4] = [3, 247].

The score of one query head, written with the codes (the base term is the same for every chunk of
that head, but not across the heads whose max is taken, so it stays):

    score = q . base + sum_c max(q_c step_c * lo_c, q_c step_c * hi_c)

approx_scores has a Triton kernel: it fuses picking the query's sketch channels, unpacking the codes,
the dot products and the max over the query heads that share a KV head, so the (H, N) score matrix
per query head is never written out; the codes (N x C / 2 bytes per KV head, N chunks) are read once.
top-k uses torch.topk, already a tuned GPU kernel: a hand-written one would not pay.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import use_triton

LEVELS = 15  # 4-bit codes: 0..15


class Sketch(NamedTuple):
    """The key sketch of one layer's middle: N chunks, C channels, per (batch, KV head)."""
    lo: torch.Tensor    # (B, H_kv, N, ceil(C/2)) uint8: each chunk's minima as codes, two a byte
    hi: torch.Tensor    # the same for the maxima; `hi is lo` for chunks of one token
    base: torch.Tensor  # (B, H_kv, C) float32: the grid's zero per channel
    step: torch.Tensor  # (B, H_kv, C) float32: its step (> 0)
    chan: torch.Tensor  # (B, H_kv, C) int64: the channel ids, sorted

    def nbytes(self) -> int:
        own = [self.lo, self.base, self.step, self.chan] + ([] if self.hi is self.lo else [self.hi])
        return sum(t.numel() * t.element_size() for t in own)


def sketch_bytes(H_kv: int, chunks: int, channels: int, bounds: bool) -> int:
    """Sketch.nbytes() for batch 1, from the shapes alone (what the planner prices)."""
    return H_kv * (chunks * ((channels + 1) // 2) * (2 if bounds else 1) + channels * (4 + 4 + 8))


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """(..., C) integer codes 0..15 -> (..., ceil(C/2)) uint8: channel j low, j + ceil(C/2) high."""
    half = (codes.shape[-1] + 1) // 2
    low, high = codes[..., :half], codes[..., half:]
    out = low.to(torch.uint8)
    out[..., :high.shape[-1]] |= high.to(torch.uint8) << 4
    return out


def make_sketch(mid_k: torch.Tensor, chan: torch.Tensor, chunk: int) -> Sketch:
    """mid_k (B, H_kv, M, D) with M a multiple of chunk, chan (B, H_kv, C) sorted channel ids -> the
    4-bit sketch of the keys at those channels, M // chunk chunks (see the module docstring)."""
    B, H_kv, M, _ = mid_k.shape
    kc = mid_k.gather(-1, chan[:, :, None, :].expand(-1, -1, M, -1)).float()  # (B, H_kv, M, C)
    base = kc.amin(dim=2)  # (B, H_kv, C)
    step = (kc.amax(dim=2) - base) / LEVELS
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant channel: every code 0
    # in place: at 128k tokens (Llama-3.1-8B, 32 channels) kc is 134 MB, allocated once during prefill
    y = kc.sub_(base[:, :, None]).div_(step[:, :, None])  # (B, H_kv, M, C) in [0, 15]
    if chunk == 1:
        lo = _pack(y.add_(0.5).floor_().clamp_(0, LEVELS))
        return Sketch(lo, lo, base, step, chan)
    y = y.view(B, H_kv, M // chunk, chunk, -1)
    # down for minima, up for maxima: the grid values enclose the chunk
    lo = torch.floor(y.amin(dim=3)).clamp(0, LEVELS)
    hi = torch.ceil(y.amax(dim=3)).clamp(0, LEVELS)
    return Sketch(_pack(lo), _pack(hi), base, step, chan)


def _dot(w: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """w (..., n, C) float32, packed (..., N, ceil(C/2)) codes -> (..., n, N): w . codes, one matmul
    per nibble (on CPU, concatenating the two halves into one (N, C) tensor costs more than the
    product)."""
    half = packed.shape[-1]
    low, high = (packed & 15).float(), (packed >> 4)[..., :w.shape[-1] - half].float()  # (..., N, half)
    return w[..., :half] @ low.transpose(-1, -2) + w[..., half:] @ high.transpose(-1, -2)


def sketch_scores(qc: torch.Tensor, sk: Sketch) -> torch.Tensor:
    """qc (B, H_kv, n, C) queries at the sketch channels -> (B, H_kv, n, N) float32 scores of every
    chunk for each query: upper bounds of the chunks' q.k on the grid (q.k itself, on the grid,
    when hi is lo)."""
    qc = qc.float()
    const = (qc * sk.base[:, :, None]).sum(-1, keepdim=True)  # (B, H_kv, n, 1)
    w = qc * sk.step[:, :, None]  # (B, H_kv, n, C)
    if sk.lo is sk.hi:
        return const + _dot(w, sk.hi)
    return const + _dot(w.clamp(min=0), sk.hi) + _dot(w.clamp(max=0), sk.lo)


def approx_scores_ref(q: torch.Tensor, sk: Sketch) -> torch.Tensor:
    """q (B, H, 1, D) -> (B, H_kv, N) float32: for each chunk, the max over the KV head's query
    heads of its score."""
    B, H, _, D = q.shape
    H_kv = sk.chan.shape[1]
    qg = q.reshape(B, H_kv, H // H_kv, D)  # (B, H_kv, n_rep, D)
    qc = qg.gather(-1, sk.chan[:, :, None, :].expand(-1, -1, H // H_kv, -1))  # (B, H_kv, n_rep, C)
    return sketch_scores(qc, sk).amax(dim=2)


@triton.jit
def _approx_scores_kernel(q_ptr, lo_ptr, hi_ptr, base_ptr, step_ptr, ch_ptr, out_ptr, N, H_KV,
                          s_qb, s_qh, s_sb, s_sh, s_sm, s_cb, s_ch, s_ob, s_oh,
                          N_REP: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BOUNDS: tl.constexpr):
    # One program: BLOCK_M chunks of one (batch, KV head). Channels are handled as two halves of
    # HALF, "a" in the low nibbles and "b" in the high ones, so codes are never interleaved.
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H_KV, pid_bh % H_KV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, HALF)
    mask_m = offs_m < N
    pc = b * s_cb + h * s_ch + offs_j  # per-channel arrays, first half; + HALF for the second
    ch_a, ch_b = tl.load(ch_ptr + pc), tl.load(ch_ptr + pc + HALF)
    base_a, base_b = tl.load(base_ptr + pc), tl.load(base_ptr + pc + HALF)
    step_a, step_b = tl.load(step_ptr + pc), tl.load(step_ptr + pc + HALF)
    sk = b * s_sb + h * s_sh + offs_m[:, None] * s_sm + offs_j[None, :]
    byte = tl.load(hi_ptr + sk, mask=mask_m[:, None], other=0).to(tl.int32)  # (BLOCK_M, HALF)
    hi_a, hi_b = (byte & 15).to(tl.float32), (byte >> 4).to(tl.float32)
    if BOUNDS:  # chunks of several tokens: minima too
        byte = tl.load(lo_ptr + sk, mask=mask_m[:, None], other=0).to(tl.int32)
        lo_a, lo_b = (byte & 15).to(tl.float32), (byte >> 4).to(tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for r in range(N_REP):  # the query heads that share this KV head
        qrow = q_ptr + b * s_qb + (h * N_REP + r) * s_qh
        qa, qb = tl.load(qrow + ch_a).to(tl.float32), tl.load(qrow + ch_b).to(tl.float32)  # (HALF,) each
        const = tl.sum(qa * base_a, axis=0) + tl.sum(qb * base_b, axis=0)
        wa, wb = qa * step_a, qb * step_b
        if BOUNDS:
            s = (tl.sum(tl.maximum(hi_a * wa[None, :], lo_a * wa[None, :]), axis=1)
                 + tl.sum(tl.maximum(hi_b * wb[None, :], lo_b * wb[None, :]), axis=1))
        else:
            s = tl.sum(hi_a * wa[None, :], axis=1) + tl.sum(hi_b * wb[None, :], axis=1)
        best = tl.maximum(best, s + const)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_m, best, mask=mask_m)


def approx_scores_triton(q: torch.Tensor, sk: Sketch) -> torch.Tensor:
    B, H, _, D = q.shape
    _, H_kv, N, half = sk.hi.shape
    C = sk.chan.shape[-1]
    if C < 4 or C & (C - 1):
        raise ValueError(f"the Triton approx_scores kernel needs a power-of-two channel count >= 4, got {C}")
    bounds = sk.lo is not sk.hi
    q = q.reshape(B, H, D).contiguous()
    hi = sk.hi.contiguous()
    lo = sk.lo.contiguous() if bounds else hi
    if lo.stride() != hi.stride():
        raise ValueError("approx_scores: the minima and maxima codes must have the same layout")
    base, step, chan = sk.base.contiguous(), sk.step.contiguous(), sk.chan.contiguous()
    out = torch.empty(B, H_kv, N, device=q.device, dtype=torch.float32)
    # A program holds its codes unpacked, BLOCK_M x C floats (twice with bounds): ~1024 x 2 keeps the
    # default (C = 32) at about 100-125 registers a thread, where BLOCK_M 128 took 168-223 (sm_90).
    BLOCK_M = min(128, max(16, 1024 // half))
    grid = (B * H_kv, triton.cdiv(N, BLOCK_M))
    _approx_scores_kernel[grid](q, lo, hi, base, step, chan, out, N, H_kv, q.stride(0), q.stride(1),
                                hi.stride(0), hi.stride(1), hi.stride(2),
                                chan.stride(0), chan.stride(1), out.stride(0), out.stride(1),
                                N_REP=H // H_kv, HALF=half, BLOCK_M=BLOCK_M, BOUNDS=bounds)
    return out


def approx_scores(q: torch.Tensor, sk: Sketch) -> torch.Tensor:
    C = sk.chan.shape[-1]
    if use_triton(q) and C >= 4 and not C & (C - 1):
        return approx_scores_triton(q, sk)
    return approx_scores_ref(q, sk)


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (B, H_kv, M) -> (B, H_kv, k) indices of the k largest, sorted by position (so the
    device buffer stays in token order and set differences are a searchsorted away). The ids are
    distinct, so a stable sort gives the same order: on a CPU it took 98 us where the default sort
    took 155 (3 heads x 1545 ids; torch 2.13)."""
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1, stable=True).values
