"""Causal attention for one chunk of prompt queries: what lets prefill run in query chunks.

Prefill used to attend with all T queries at once, which holds the queries, the attention output
and its reshaped copy for every prompt token (for Llama-3.1-8B at 128k: 1 GiB each in bf16). In
query chunks of C tokens only the chunk's queries and output exist; the keys and values of the
whole prefix are needed anyway (the layer's KV policy receives them).

The chunk holds the *last* C positions of a prefix of S tokens (S = keys so far), so query i of
the chunk (position S - C + i) may see keys 0 .. S - C + i: the causal mask is aligned to the
bottom-right corner of the (C, S) score matrix. SDPA's `is_causal=True` aligns it to the top-left
when C < S, so it cannot be used directly:

    C = 2, S = 4      bottom-right (wanted)     top-left (is_causal)
    query at pos 2    1 1 1 0                   1 0 0 0
    query at pos 3    1 1 1 1                   1 1 0 0

On CUDA, torch's `causal_lower_right` bias runs this in one flash-attention kernel. On CPU that
bias would materialise the (C, S) mask (it grows with S), so the chunk is split in two mask-free
parts and merged by their log-sum-exp, as flash-decoding merges its splits:

    prefix   keys 0 .. S-C-1   every query of the chunk sees all of them: no mask
    diagonal keys S-C .. S-1   a square block: plain causal (top-left == bottom-right)

    out = (e^lse_p * out_p + e^lse_d * out_d) / (e^lse_p + e^lse_d)

where lse = log sum exp(q.k / sqrt(D)) over a part's keys, so e^lse is the part's softmax
denominator. The CPU flash-attention op returns lse beside the output (GQA-aware, no expanded K/V).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, H, C, D): queries of the last C positions; k, v (B, H_kv, S, D): keys and values of
    positions 0 .. S-1 (S >= C). Returns (B, H, C, D), causal attention with GQA."""
    C, S = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if C == S:  # the first chunk: a square causal mask
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if q.device.type != "cpu":
        return lower_right_attention(q, k, v)
    o_p, lse_p = _attention_lse(q, k[:, :, :S - C], v[:, :, :S - C], causal=False)
    o_d, lse_d = _attention_lse(q, k[:, :, S - C:], v[:, :, S - C:], causal=True)
    lse = torch.logaddexp(lse_p, lse_d)  # (B, H, C)
    w_p = (lse_p - lse).exp().unsqueeze(-1)  # the prefix's share of the softmax mass, (B, H, C, 1)
    return (o_p.float() * w_p + o_d.float() * (1 - w_p)).to(q.dtype)


def lower_right_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same attention through torch's bottom-right causal bias: one fused kernel on CUDA; on
    CPU it materialises the (C, S) mask (used there only by the tests, as a second reference).

    The bias runs fused in flash attention (16-bit dtypes, which take GQA) or in memory-efficient
    attention, which takes no GQA; anything else materialises the mask, and the math fallback then
    holds (B, H, C, S) scores: 32 GiB per chunk for Llama-3.1-8B in float32 at 128k. So float32
    with GQA runs one KV head's query group at a time, that head's K/V broadcast over the group as
    a zero-stride view (no copy), which memory-efficient attention accepts."""
    B, H, C, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    mask = causal_lower_right(C, S)
    if H == H_kv or q.dtype != torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != H_kv)
    rep = H // H_kv
    return torch.cat([F.scaled_dot_product_attention(q[:, g * rep:(g + 1) * rep], k[:, g:g + 1].expand(B, rep, S, D),
                                                     v[:, g:g + 1].expand(B, rep, S, D), attn_mask=mask)
                      for g in range(H_kv)], dim=1)  # (B, H, C, D)


def _attention_lse(q, k, v, causal: bool):
    """CPU flash attention that also returns lse (B, H, C) in float32."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse.float()
