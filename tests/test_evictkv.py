"""BudgetedEvictKV: exact when the budget covers the context, SnapKV scoring, decode-time eviction
bounded by the budget, bad parameters."""
import pytest
import torch

from engine.config import preset
from engine.kv.evict import BudgetedEvictKV, window_scores
from engine.model import Llama
from stepping import decode_logits

ARGS = preset("tiny", vocab_size=300, n_heads=4, n_kv_heads=2, dim=128, n_layers=3)


@pytest.mark.parametrize("during_decode", [False, True])
def test_budget_covering_context_equals_fullkv(during_decode):
    model = Llama.random(ARGS, "cpu", torch.float32, seed=2)
    tokens = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(0))
    full, _ = decode_logits(model, tokens, {"policy": "full"}, 100)
    ev, _ = decode_logits(model, tokens, {"policy": "evict", "budget": 150, "window": 8,
                                       "evict_during_decode": during_decode}, 100)
    assert torch.equal(full, ev)


def test_small_budget_differs_and_decode_eviction_stays_bounded():
    model = Llama.random(ARGS, "cpu", torch.float32, seed=2)
    tokens = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(0))
    full, _ = decode_logits(model, tokens, {"policy": "full"}, 100)
    ev, pol = decode_logits(model, tokens, {"policy": "evict", "budget": 40, "window": 8}, 100)
    assert not torch.equal(full, ev)
    assert pol[0].k.shape[2] == 40 + 50  # prompt kept to 40, then room for every decoded token
    assert pol[0].row_offset == 40 - 100  # position p sits in row p - 60
    _, pol = decode_logits(model, tokens, {"policy": "evict", "budget": 40, "window": 8,
                                        "evict_during_decode": True}, 100)
    p = pol[0]
    assert p.k.shape[2] == 40 and bool((p.pos >= 0).all())  # every slot live, never more than 40
    newest = torch.arange(150 - 7, 150)  # the window's newest tokens are never evicted
    assert all(int(t) in p.pos[0, h].tolist() for h in range(2) for t in newest)


def test_decode_eviction_spares_exactly_the_window_newest_tokens():
    """Decode eviction takes the slot of least attention mass among all but the `window` newest
    tokens, the one being written included: at position 4 with window 2, token 3 is spared and
    token 2 (= 4 - window) is fair game."""
    H, D = ARGS.n_kv_heads, ARGS.head_dim
    k, v = torch.zeros(1, H, 4, D), torch.zeros(1, H, 4, D)
    pol = BudgetedEvictKV(ARGS, 0, 8, "cpu", torch.float32, budget=4, window=2, pool=1, evict_during_decode=True)
    pol.prefill(k, v, torch.zeros(1, ARGS.n_heads, 2, D))  # 4 tokens fit the budget: rows hold positions 0-3
    q, new = torch.zeros(1, ARGS.n_heads, 1, D), torch.ones(1, H, 1, D)
    for least, evicted in ((2, 2), (3, 0)):  # the least mass on token 2: it goes; on token 3: spared, 0 goes
        pol.pos[:] = torch.arange(4)
        pol.acc[:] = torch.tensor([1.0, 2.0, 3.0, 4.0])
        pol.acc[..., least] = 0.0
        pol.length = 4
        pol.before_step()
        pol.attend(q, new, new, torch.tensor([4]))
        want = [4 if p == evicted else p for p in range(4)]
        assert pol.pos.tolist() == [[want] * H], (least, pol.pos.tolist())


def test_window_scores_are_causal_and_pooled():
    k = torch.zeros(1, 1, 6, 4)
    k[0, 0, 5, 0] = 50.0  # the last key would dominate any query that could see it
    q = torch.zeros(1, 1, 2, 4)
    q[..., 0] = 1.0
    mass = window_scores(k, q, pool=1)[0, 0]
    # query 0 sits at position 4 and cannot see key 5; query 1 (position 5) puts ~all its mass there
    assert abs(mass.sum().item() - 2.0) < 1e-5
    assert abs(mass[5].item() - 1.0) < 1e-5
    assert abs(mass[:5].sum().item() - 1.0) < 1e-5
    pooled = window_scores(k, q, pool=3)[0, 0]
    assert abs(pooled[4].item() - (mass[3] + mass[4] + mass[5]).item() / 3) < 1e-6


@pytest.mark.parametrize("T, w, block", [(100, 32, 8192), (100, 32, 7), (40, 40, 16), (5, 3, 2)])
def test_window_scores_in_blocks_equal_one_softmax(T, w, block):
    """Keys scored a block at a time (the softmax's max and denominator first, then the shares)
    == one softmax over all of them, whether a block boundary falls inside the window or not."""
    g = torch.Generator().manual_seed(T + block)
    k, q = torch.randn(2, 3, T, 16, generator=g) * 3, torch.randn(2, 6, w, 16, generator=g) * 3
    logits = q.view(2, 3, 2 * w, 16) @ k.transpose(-1, -2) / 4.0  # (2, 3, 2w, T): rows (head, query)
    future = torch.arange(T) > torch.arange(T - w, T).repeat(2)[:, None]
    want = logits.masked_fill(future, float("-inf")).softmax(-1).sum(2)  # (2, 3, T)
    torch.testing.assert_close(window_scores(k, q, pool=1, block=block), want, rtol=1e-5, atol=1e-6)


def test_high_attention_token_is_kept():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 200, 32, generator=g) * 0.1
    v = torch.randn(1, 2, 200, 32, generator=g)
    q = torch.zeros(1, 4, 8, 32)
    q[..., 3] = 5.0
    k[:, :, 57, 3] = 10.0  # token 57 is what the window's queries look at
    p = BudgetedEvictKV(ARGS, 0, 210, "cpu", torch.float32, budget=16, window=8, pool=1)
    p.prefill(k, v, q)
    assert p.row_offset == 16 - 200  # 16 of the 200 prompt tokens kept
    kept = (p.k[0, 0, :, 3] == 10.0).nonzero().flatten().tolist()
    assert len(kept) == 1


def test_bad_parameters():
    with pytest.raises(ValueError, match="window"):
        BudgetedEvictKV(ARGS, 0, 100, "cpu", torch.float32, budget=8, window=16)
    with pytest.raises(ValueError, match="odd"):
        BudgetedEvictKV(ARGS, 0, 100, "cpu", torch.float32, pool=4)
    with pytest.raises(ValueError, match=">= 1"):
        BudgetedEvictKV(ARGS, 0, 100, "cpu", torch.float32, budget=0)


def test_decode_eviction_attends_over_numbers_in_its_free_rows(monkeypatch):
    """On CUDA, decode eviction multiplies every row of the buffer by its probability, 0 for a free
    row; 0 x NaN (or inf) is NaN, so free rows must not be uninitialised memory, which on a GPU is
    often a freed block of -inf scores. Simulated here: torch.empty hands back NaN, and a CPU query
    that says is_cuda takes the CUDA branch, which must then equal the CPU branch."""
    class CudaLike(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    real_empty, real_empty_like = torch.empty, torch.empty_like
    g = torch.Generator().manual_seed(0)
    H, D, T = ARGS.n_kv_heads, ARGS.head_dim, 20
    k, v, q_win = torch.randn(1, H, T, D, generator=g), torch.randn(1, H, T, D, generator=g), torch.randn(1, 4, 8, D, generator=g)
    q, k_new, v_new = torch.randn(1, 4, 1, D, generator=g), torch.randn(1, H, 1, D, generator=g), torch.randn(1, H, 1, D, generator=g)
    outs = []
    for query in (q, q.as_subclass(CudaLike)):
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
            m.setattr(torch, "empty_like", lambda *a, **kw: real_empty_like(*a, **kw).fill_(float("nan")))
            pol = BudgetedEvictKV(ARGS, 0, 64, "cpu", torch.float32, budget=40, window=8, evict_during_decode=True)
            pol.prefill(k, v, q_win)  # 20 tokens in 40 rows: 20 free
        pol.before_step()
        outs.append(torch.Tensor(pol.attend(query, k_new, v_new, torch.tensor([T]))))
        assert torch.isfinite(pol.acc).all()
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=0)
