"""The profile's OffloadKV retention is what the policy really keeps: the decode query's attention
mass on the tokens an OffloadKV of that budget holds, chunks and all."""
import math

import pytest
import torch

from engine.config import preset
from engine.kv.offload import OffloadKV
from engine.profile import FRACTIONS, ProfileConfig, layer_stats
from stepping import attend_next

ARGS = preset("tiny", vocab_size=300, n_heads=4, n_kv_heads=2, dim=128, n_layers=1)  # head_dim 32


@pytest.mark.parametrize("chunk", [1, 4])
def test_offload_retention_matches_the_policy(chunk):
    T, D = 203, ARGS.head_dim
    g = torch.Generator().manual_seed(chunk)
    k, v = torch.randn(1, 2, T + 1, D, generator=g), torch.randn(1, 2, T + 1, D, generator=g)
    k[:, :, 90:94] *= 3  # a few tokens that stand out, as a needle would
    q_prompt, q_dec = torch.randn(1, 4, 32, D, generator=g), torch.randn(1, 4, 1, D, generator=g)
    params = {"sink": 4, "recent": 8, "channels": 8, "chunk": chunk}
    stats = layer_stats(k, v, T, q_prompt, q_dec, ARGS, ProfileConfig(offload=params))
    probs = ((q_dec.reshape(1, 2, 2, D) @ k.transpose(-1, -2)) / math.sqrt(D)).softmax(-1)  # (1, 2, 2, T + 1)
    for i in (8, 16, 24):  # budgets of 1/8, 1/4, 3/8 of the prompt
        budget = round(FRACTIONS[i] * T)
        p = OffloadKV(ARGS, 0, T + 1, "cpu", torch.float32, budget=budget, **params)
        p.prefill(k[:, :, :T], v[:, :, :T], q_prompt)
        attend_next(p, q_dec, k[:, :, T:], v[:, :, T:])
        kept = torch.zeros(1, 2, T + 1, dtype=torch.bool)
        kept[:, :, :p.S] = True
        kept[:, :, p.S + p.M:] = True  # recent (with the chunks' leftover) and the decoded token
        for h in range(2):
            for j in p.slots[0, h].tolist():
                kept[0, h, p.S + j * chunk:p.S + (j + 1) * chunk] = True
        assert kept[0, 0, p.S:p.S + p.M].sum() == p.top
        mass = (probs * kept[:, :, None]).sum(-1).mean().item()
        assert stats.offload[i] == pytest.approx(mass, abs=1e-5), (i, budget)
