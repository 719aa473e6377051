"""tools/sketch_mass.py: the share of attention mass a sketch's selection keeps, token and chunk level."""
import types

import pytest
import torch

from tools.sketch_mass import layer_masses

SKETCHES = [("exact", 0), ("float", 4), ("8bit", 4), ("4bit", 4), ("mean", 4), ("mean", 16)]


def recording(T: int, chunk: int, seed: int = 0, D: int = 16):
    """What the recorder keeps for one layer: 2 KV heads with one query head each (n_rep 1: the
    exact score then ranks like the softmax mass), keys constant within each chunk."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, T // chunk, D, generator=g).repeat_interleave(chunk, dim=2)
    queries = [torch.randn(1, 2, 1, D, generator=g) * 2 for _ in range(3)]
    return types.SimpleNamespace(prompt_k=k, q_prompt=torch.randn(1, 2, 32, D, generator=g), queries=queries)


def best_mass(rec, S: int, M: int, top: int, chunk: int) -> float:
    """The most a selection of top // chunk whole chunks can keep, averaged like layer_masses."""
    mid = rec.prompt_k[:, :, S:S + M]
    kept = []
    for q in rec.queries:
        p = (q.reshape(1, 2, 1, -1) @ mid.transpose(-1, -2) / mid.shape[-1] ** 0.5).softmax(-1)
        kept.append(p.unflatten(-1, (-1, chunk)).sum(-1).topk(top // chunk, -1).values.sum(-1).mean().item())
    return sum(kept) / len(kept)


@pytest.mark.parametrize("chunk", [1, 4])
def test_exact_keeps_the_most_and_every_sketch_at_most_that(chunk):
    T, sink, recent, fraction = 512, 16, 64, 0.3  # budget 153: 73 middle tokens, 18 chunks of 4
    rec = recording(T, chunk)
    masses = layer_masses(rec, SKETCHES, sink, recent, fraction, chunk)
    from engine.kv.offload import OffloadKV
    S, M, _, top = OffloadKV.layout(T, int(fraction * T), sink, recent, chunk)
    assert masses[0] == pytest.approx(best_mass(rec, S, M, top, chunk), abs=1e-6)
    assert all(0 < m <= masses[0] + 1e-6 for m in masses)
    assert masses[-1] > 0.9 * masses[0]  # the chunk means at every channel: only the 4-bit grid is lost


def test_a_budget_covering_the_middle_keeps_all_of_it():
    rec = recording(256, 4)
    assert layer_masses(rec, SKETCHES, 16, 64, 1.0, 4) == pytest.approx([1.0] * len(SKETCHES))
