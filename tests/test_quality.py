"""Quality metrics on hand-made cases, fidelity against FullKV, and teacher forcing from a shared
prefill agreeing with each policy's own run."""
import math

import pytest
import torch

from engine.eval.quality import (fidelity, greedy, kl_divergence, perplexity, shared_prefill, teacher_forced,
                                 top1_agreement)
from engine.kv import build_policies
from engine.model import Llama
from helpers import TINY
from stepping import decode_logits


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


def test_fidelity_is_measured_against_fullkv():
    """fidelity's reference is FullKV, recomputed here by one parallel forward pass over prompt +
    continuation; policies that keep a fraction of the prompt show a KL above zero, and the top-1,
    perplexities and host->device bytes that their own teacher-forced logits give."""
    model = Llama.random(TINY, "cpu", torch.float32, seed=1)
    prompt, cont = list(range(10, 90)), list(range(90, 110))
    specs = [{"policy": "evict", "budget": 16, "window": 8},
             {"policy": "offload", "budget": 24, "sink": 4, "recent": 8, "channels": 8}]
    fids = fidelity(model, prompt, cont, specs)
    tokens = torch.tensor([prompt + cont[:-1]])
    policies = build_policies(TINY, {"policy": "full"}, tokens.shape[1], "cpu", torch.float32)
    full = model.prefill(tokens, policies, all_logits=True)[0, len(prompt) - 1:]  # (N, vocab): each next token
    for f, (logits, pols) in zip(fids, teacher_forced(model, prompt, cont, specs)):
        assert f.kl > 1e-3  # a metric that ignored the policy would say 0
        assert abs(f.kl - kl_divergence(full, logits).mean().item()) < 1e-5
        assert abs(f.top1 - top1_agreement(full, logits)) <= 1 / len(cont)  # a near-tie may flip one position
        assert abs(f.ppl - perplexity(logits, cont)) < 1e-9 and abs(f.ppl_full / perplexity(full, cont) - 1) < 1e-5
        # bytes per decode step: the continuation's first token comes from the prefill, not a step
        assert f.h2d_bytes_per_token == sum(p.transfer_bytes() for p in pols) / (len(cont) - 1)
    assert fids[0].h2d_bytes_per_token == 0 < fids[1].h2d_bytes_per_token  # only offloading copies to the device


@pytest.mark.parametrize("T", [100, 20])
def test_shared_prefill_equals_separate_runs(T):
    """Policies measured from one shared prefill get exactly what their own prefill would give,
    also the last queries each asks for (QuantKV's heavy hitters are picked by the last 32) when
    the prompt is shorter than that window: then all of them (the slice once wrapped around)."""
    model = Llama.random(TINY, "cpu", torch.float32, seed=4)
    prompt, cont = list(range(5, 5 + T)), list(range(105, 125))
    specs = [{"policy": "evict", "budget": 40, "window": 8},
             {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8},
             {"policy": "quant", "bits": 2, "group": 32, "residual": 32},
             {"policy": "quant", "bits": 2, "group": 32, "residual": 32, "heavy": 0.25}]
    shared = teacher_forced(model, prompt, cont, specs)
    for spec, (logits, _) in zip(specs, shared):
        alone, _ = decode_logits(model, torch.tensor([prompt + cont[:-1]]), spec, len(prompt))
        assert torch.equal(alone[:, 0], logits)


def test_greedy_answers_are_the_argmax_of_one_parallel_forward(default_model):
    """The harness's greedy decoding (pass-key and RULER answers): each token is the argmax at its
    position, as one teacher-forced forward over prompt + answer says, and it stops after the
    first end-of-sequence token or at max_new_tokens. (The default model, whose answer is words:
    a random model repeats one token, which an answer decoded at the wrong positions repeats too.)"""
    model, tok = default_model.model, default_model.tokenizer
    prompt, n = tok.encode("The capital of France is Paris. The capital of Italy is Rome. The capital of"), 12

    def answer(max_new, eos_ids):
        first, per_spec = shared_prefill(model, prompt, [{"policy": "full"}], n)
        return greedy(model, per_spec[0], first, len(prompt), max_new, eos_ids)

    ids = answer(n, set())
    tokens = torch.tensor([prompt + ids[:-1]])
    policies = build_policies(model.args, {"policy": "full"}, tokens.shape[1], "cpu", torch.float32)
    assert model.prefill(tokens, policies, all_logits=True)[0, len(prompt) - 1:].argmax(-1).tolist() == ids
    assert len(set(ids)) > 3, tok.decode(ids)
    assert answer(5, set()) == ids[:5]
    stop = ids.index(ids[6]) + 1
    assert answer(n, {ids[6], 10**6}) == ids[:stop]
