"""Batches: several prompts of different lengths decoded together must give each prompt exactly what
it gets alone, for every policy; sequences end on their own; bad batches fail before any work."""
import pytest
import torch

from engine.api import LLM
from engine.graphs import Decoder
from engine.kv import build_policies, parse_policy
from engine.model import Llama
from engine.runner import GenerationResult, stream_batch
from engine.sampling import SamplingParams
from helpers import TINY

pytestmark = pytest.mark.usefixtures("reuse_models")

# Budgets below the prompts' lengths, so eviction and selection really happen.
SPECS = ["full", "quant:bits=4", "evict:budget=24,window=8", "offload:budget=16,sink=2,recent=4",
         "offload:budget=16,sink=2,recent=4,lookahead=layer"]
MODEL_SPECS = ["full", "quant:bits=4", "evict:budget=64", "offload:budget=96", "hybrid"]


@pytest.mark.parametrize("spec", SPECS)
def test_batched_step_logits_equal_each_sequence_alone(spec):
    """Two sequences (prompts of 45 and 29 tokens) stepped together: each row's logits equal that
    sequence stepped alone, at every step (the batch shares matmuls, never cache rows)."""
    model = Llama.random(TINY, "cpu", torch.float32, seed=1)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, TINY.vocab_size, (1, n), generator=gen) for n in (45, 29)]
    steps = 6

    def run(indices):
        pols = {i: build_policies(TINY, parse_policy(spec), seqs[i].shape[1] + steps, "cpu", torch.float32)
                for i in indices}
        for i in indices:
            model.prefill(seqs[i][:, :-steps], pols[i])
        dec, out = Decoder(model, [pols[i] for i in indices]), []
        for s in range(steps):
            pos = [seqs[i].shape[1] - steps + s for i in indices]
            out.append(dec.step(torch.cat([seqs[i][:, p] for i, p in zip(indices, pos)]), pos).clone())
        return torch.stack(out)  # (steps, B, vocab)

    both = run([0, 1])
    for b in (0, 1):
        torch.testing.assert_close(both[:, b], run([b])[:, 0], atol=2e-5, rtol=0)


def _prompts(llm):
    base = ("The harbour town kept its records in a ledger by the lighthouse. Each entry named a ship, "
            "its cargo and the day it left. ")
    return [base * 12 + "Summarise the ledger in one sentence:",
            base * 3 + "Write a short poem about the sea and a lighthouse keeper.",
            base * 6 + "Which building held the ledger? Answer:"]


@pytest.mark.parametrize("policy", MODEL_SPECS)
def test_generate_batch_equals_each_prompt_alone(policy):
    """The public API on the default model: a batch of three prompts of different lengths (about
    90-340 tokens) gives each prompt its own greedy tokens, token for token, for every policy,
    a hybrid plan included (each prompt profiled and planned on its own)."""
    llm = LLM(device="cpu", dtype="float32")
    prompts = _prompts(llm)
    plan = dict(kv_budget=0.6, floor=8) if policy == "hybrid" else {}
    outs = llm.generate(prompts, max_new_tokens=10, policy=policy, **plan)
    assert len(outs) == 3 and len({o.prompt_tokens for o in outs}) == 3
    for p, o in zip(prompts, outs):
        alone = llm.generate(p, max_new_tokens=10, policy=policy, **plan)
        assert o.token_ids == alone.token_ids and o.text == alone.text
        assert o.kv_bytes == alone.kv_bytes and o.layers == alone.layers
    if policy == "hybrid":  # the long prompt's plan is not all FullKV, so something was compressed
        assert any(layer["policy"] != "full" for layer in outs[0].layers)


def test_stream_batch_pieces_and_own_limits():
    """stream() of a batch yields (index, piece) pairs whose concatenation per index is that
    output's text; each prompt stops at its own max_new_tokens while the others go on; on_token
    counts every generated token (what generate.py's batch bar shows), pieces or not."""
    llm = LLM(device="cpu", dtype="float32")
    prompts = _prompts(llm)
    counted = [0, 0, 0]
    s = llm.stream(prompts, max_new_tokens=[2, 9, 3], chat=True,  # chat: answers longer than the limits
                   on_token=lambda i: counted.__setitem__(i, counted[i] + 1))
    texts = ["", "", ""]
    for i, piece in s:
        texts[i] += piece
    assert [len(o.token_ids) for o in s.outputs] == [2, 9, 3] == counted
    assert [o.stop_reason for o in s.outputs] == ["length"] * 3
    assert texts == [o.text for o in s.outputs]
    assert s.outputs[1].token_ids == llm.generate(prompts[1], max_new_tokens=9, chat=True).token_ids


def test_a_sequence_ending_on_eos_leaves_the_batch():
    """Sequence 0 meets an end token at its 2nd step and stops there; sequence 1 goes on to its own
    limit (or its own first end token) with the tokens it gets alone."""
    model = Llama.random(TINY, "cpu", torch.float32, seed=2)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, TINY.vocab_size, (n,), generator=gen).tolist() for n in (40, 23)]

    def run(ps, eos=frozenset()):
        results = [GenerationResult(len(p)) for p in ps]
        for _ in stream_batch(model, ps, [8] * len(ps), SamplingParams(), [{"policy": "full"}] * len(ps),
                              results, eos):
            pass
        return results

    alone = [run([p])[0].generated_ids for p in prompts]
    eos = {alone[0][1]}
    r0, r1 = run(prompts, eos)
    assert r0.generated_ids == alone[0][:2] and r0.stop_reason == "eos"
    cut = next((i + 1 for i, t in enumerate(alone[1]) if t in eos), 8)
    assert r1.generated_ids == alone[1][:cut]
    assert len(r1.decode_times_s) == len(r1.generated_ids) - 1
    # its first step warmed a Decoder up, and so did its second: the batch had shrunk to it alone
    assert r1.settling == [True, True] + [False] * (len(r1.decode_times_s) - 2)


def test_decode_time_leaves_warm_up_and_capture_steps_out():
    r = GenerationResult(5, decode_times_s=[0.5, 0.4, 0.01, 0.5, 0.4, 0.02, 0.03],
                         settling=[True, True, False, True, True, False, False])
    assert r.decode_ms_per_token == pytest.approx(20.0)  # the steady steps' median, not 400
    r.settling = [True] * 7  # no steady step: all of them
    assert r.decode_ms_per_token == pytest.approx(400.0)


def test_bad_batches_fail_before_any_work(monkeypatch):
    llm = LLM(device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([])
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        llm.generate(["hello", "  "])
    with pytest.raises(ValueError, match="2 max_new_tokens values for 3 prompts"):
        llm.generate(["a", "b", "c"], max_new_tokens=[1, 2])
    for prompts in ([], [[5, 6], []]):  # the runner's own check, for callers below the API
        with pytest.raises(ValueError, match="empty prompt"):
            next(stream_batch(llm.model, prompts, [1] * len(prompts), SamplingParams(),
                              [{"policy": "full"}] * len(prompts), [GenerationResult(len(p)) for p in prompts]))
    import engine.api
    import engine.fit
    full_one = llm.full_kv_bytes(8 + 4)
    monkeypatch.setattr(engine.fit, "free_memory", lambda device: int(2.5 * full_one))
    monkeypatch.setattr(engine.api, "stream_batch", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match=r"3 sequences .* needs .* is free"):
        llm.generate([[1] * 8] * 3, max_new_tokens=4)
