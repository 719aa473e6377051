"""Rotary position embeddings (RoPE), with Llama-3.1's frequency rescaling ("rope_type": "llama3").

We use the Hugging Face layout: a head vector is split in two halves that rotate together
(`rotate_half`), not Meta's interleaved pairs. GGUF files store q/k rows permuted for the interleaved
layout; the importer undoes that, so the model code only ever sees this one convention. Applying
the rotation is kernels/rotary.py's (apply_rope, and a fused kernel for q and k in place).
"""
from __future__ import annotations

import math

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """(head_dim/2,) float32 angular frequencies, exactly as transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed down by `factor` so positions past the original
    # context stay in the range the model saw in training; short ones are left alone; in between
    # the two are blended linearly in 1/wavelength.
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (T, head_dim) for integer positions (T,); angles computed in float32."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, D): both halves rotate by the same angle
    return angles.cos().to(dtype), angles.sin().to(dtype)
