"""engine/sampling.py: greedy at temperature 0, top-k and top-p (nucleus) keep exactly the tokens
they should, draws follow the softmax, and a seed makes them reproducible."""
import torch

from engine.sampling import SamplingParams, make_generator, sample

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])  # token i's probability at temperature 1
N = 4000  # draws per check, as one batch of identical rows


def draws(**kw) -> torch.Tensor:
    p = SamplingParams(temperature=kw.pop("temperature", 1.0), seed=0, **kw)
    return sample(PROBS.log().expand(N, -1), p, make_generator(p, "cpu"))


def test_greedy_is_the_argmax():
    p = SamplingParams()
    assert make_generator(p, "cpu") is None
    assert sample(torch.tensor([[0.1, 2.0, 1.0], [5.0, -1.0, 4.9]]), p, None).tolist() == [1, 0]


def test_top_k_keeps_the_k_most_likely_in_proportion():
    got = draws(top_k=2)
    assert set(got.tolist()) == {0, 1}
    share = (got == 0).float().mean().item()  # 0.5 / (0.5 + 0.3) = 0.625 once renormalised
    assert abs(share - 0.625) < 0.03
    assert set(draws(top_k=4).tolist()) == set(draws(top_k=0).tolist()) == {0, 1, 2, 3}  # k >= V: off


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    """A token stays while the tokens ranked above it hold less than top_p: at 0.79, tokens 0 and 1
    (0.5 before token 1, 0.8 before token 2); at 0.81 token 2 as well; the most likely one always."""
    assert set(draws(top_p=0.79).tolist()) == {0, 1}
    assert set(draws(top_p=0.81).tolist()) == {0, 1, 2}
    assert set(draws(top_p=0.01).tolist()) == {0}
    assert set(draws(top_p=1.0).tolist()) == {0, 1, 2, 3}


def test_draws_follow_the_softmax_at_a_temperature():
    got = draws(temperature=2.0)  # p ~ sqrt(PROBS), renormalised
    want = PROBS.sqrt() / PROBS.sqrt().sum()
    freq = torch.bincount(got, minlength=4).float() / N
    assert (freq - want).abs().max().item() < 0.03


def test_a_seed_reproduces_the_draws():
    assert torch.equal(draws(top_p=0.9), draws(top_p=0.9))
    p = SamplingParams(temperature=1.0, seed=1)
    other = sample(PROBS.log().expand(N, -1), p, make_generator(p, "cpu"))
    assert not torch.equal(draws(), other)
