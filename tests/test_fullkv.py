"""FullKV: prefill-then-decode must equal one full forward over the whole sequence."""
import pytest
import torch

from engine.config import preset
from engine.kv import build_policies
from engine.graphs import Decoder
from engine.model import Llama


@pytest.mark.parametrize("split", [1, 17, 64])
def test_prefill_then_decode_equals_full_forward(split):
    args = preset("tiny", vocab_size=300)
    model = Llama.random(args, "cpu", torch.float32, seed=3)
    tokens = torch.randint(0, 300, (1, 80), generator=torch.Generator().manual_seed(0))
    full = model.prefill(tokens, build_policies(args, {"policy": "full"}, 80, "cpu", torch.float32),
                         all_logits=True)[0]  # (T, V)
    policies = build_policies(args, {"policy": "full"}, 80, "cpu", torch.float32)
    last = model.prefill(tokens[:, :split], policies)[0]
    torch.testing.assert_close(last, full[split - 1], atol=1e-5, rtol=0)
    decoder = Decoder(model, policies)
    for pos in range(split, 80):
        step = decoder.step(tokens[:, pos], pos)[0]
        torch.testing.assert_close(step, full[pos], atol=1e-5, rtol=0)
    assert policies[0].length == 80
    expected = 2 * args.n_kv_heads * 80 * args.head_dim * 4
    assert policies[0].nbytes() == {"device": expected, "host": 0}


def test_capacity_overflow_is_an_error():
    args = preset("tiny", vocab_size=300)
    model = Llama.random(args, "cpu", torch.float32)
    policies = build_policies(args, {"policy": "full"}, 4, "cpu", torch.float32)
    model.prefill(torch.zeros(1, 4, dtype=torch.long), policies)
    with pytest.raises(RuntimeError, match="capacity"):
        Decoder(model, policies).step(torch.zeros(1, dtype=torch.long), 4)


def test_unknown_policy_and_wrong_layer_count():
    args = preset("tiny")
    with pytest.raises(ValueError, match="unknown KV policy"):
        build_policies(args, {"policy": "nope"}, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="layer specs"):
        build_policies(args, [{"policy": "full"}], 8, "cpu", torch.float32)


def test_store_rounds_the_cache_and_reports_its_bytes():
    """full:store=bfloat16 under a float32 model attends exactly as a float32 FullKV whose K/V were
    rounded to bfloat16 (the suite's noise floor), and holds and prices half the bytes."""
    from engine.kv import parse_policy, spec_cost
    from engine.kv.full import FullKV
    from kernels.dense_attn import decode_attention
    args = preset("tiny", vocab_size=300)
    g = torch.Generator().manual_seed(1)
    B, T, D = 2, 40, args.head_dim
    k, v = (torch.randn(B, args.n_kv_heads, T + 1, D, generator=g) * 3 for _ in range(2))
    q = torch.randn(B, args.n_heads, 1, D, generator=g)
    spec = parse_policy("full:store=bfloat16")
    p = build_policies(args, spec, T + 1, "cpu", torch.float32)[0]
    p.prefill(k[:, :, :T], v[:, :, :T])
    out = p.attend(q, k[:, :, T:], v[:, :, T:], torch.tensor([T]))
    r = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    torch.testing.assert_close(out, decode_attention(q, r(k), r(v)), atol=1e-6, rtol=0)
    assert not torch.allclose(out, decode_attention(q, k, v), atol=1e-4)  # the rounding is seen
    expected = 2 * args.n_kv_heads * (T + 1) * D * 2  # per sequence, bfloat16
    assert p.nbytes()["device"] == B * expected == B * spec_cost(args, spec, T, 1, 4)["device"]
    assert p.describe()["store"] == "bfloat16"
    with pytest.raises(ValueError, match="store must be"):
        FullKV(args, 0, 8, "cpu", torch.float32, store="int8")
