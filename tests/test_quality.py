"""Quality metrics on hand-made cases, and teacher forcing agreeing with itself."""
import math

import torch

from engine.config import preset
from engine.model import Llama
from engine.kv import build_policies
from engine.quality import fidelity, kl_divergence, perplexity, teacher_forced, top1_agreement


def test_kl_of_identical_distributions_is_zero():
    x = torch.randn(5, 11)
    assert kl_divergence(x, x).abs().max() < 1e-6
    assert kl_divergence(x, x + 3.0).abs().max() < 1e-5  # logits shifted by a constant: same distribution


def test_kl_known_value_and_asymmetry():
    p = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    q = torch.tensor([[0.0, 0.0]])            # 1/2, 1/2
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert abs(kl_divergence(p, q).item() - expected) < 1e-6
    assert abs(kl_divergence(q, p).item() - expected) > 1e-3


def test_top1_and_perplexity():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 1.0]])
    assert abs(top1_agreement(a, b) - 2 / 3) < 1e-6
    assert abs(perplexity(torch.zeros(4, 10), [1, 2, 3, 4]) - 10.0) < 1e-4  # uniform: ppl = vocab size


def test_fullkv_against_itself_is_perfect():
    args = preset("tiny", vocab_size=300)
    model = Llama.random(args, "cpu", torch.float32, seed=1)
    prompt, cont = list(range(10, 60)), list(range(60, 80))
    [f] = fidelity(model, prompt, cont, [{"policy": "full"}])
    assert f.kl == 0.0 and f.top1 == 1.0 and f.ppl == f.ppl_full and f.h2d_bytes_per_token == 0


def test_shared_prefill_equals_separate_runs():
    """Policies measured from one shared prefill get exactly what their own prefill would give."""
    args = preset("tiny", vocab_size=300, n_heads=4, n_kv_heads=2, dim=128)
    model = Llama.random(args, "cpu", torch.float32, seed=4)
    prompt, cont = list(range(5, 105)), list(range(105, 125))
    specs = [{"policy": "evict", "budget": 40, "window": 8},
             {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8},
             {"policy": "quant", "bits": 2, "group": 32, "residual": 32}]
    shared = teacher_forced(model, prompt, cont, specs)
    for spec, (logits, _) in zip(specs, shared):
        policies = build_policies(args, spec, len(prompt) + len(cont), "cpu", torch.float32)
        alone = [model.prefill(torch.tensor([prompt]), policies)[0]]
        alone += [model.decode_step(torch.tensor([t]), len(prompt) + i, policies)[0] for i, t in enumerate(cont[:-1])]
        assert torch.equal(torch.stack(alone), logits)
