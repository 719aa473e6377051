"""The graph form of a decode step (positions as device tensors, attend_at + advance) equals the
eager step; the device-length attention kernel equals its reference; on CUDA, replayed graphs equal
eager decoding (skipped without a GPU)."""
import pytest
import torch

from engine.config import preset
from engine.kv import build_policies
from engine.model import Llama
from interpreted import check_interpreted

ARGS = preset("tiny", vocab_size=300, n_heads=4, n_kv_heads=2, dim=128, n_layers=3)  # head_dim 32
SPECS = [
    {"policy": "full"},
    {"policy": "evict", "budget": 40, "window": 8},
    {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8, "lookahead": "none"},
    {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8, "lookahead": "layer"},
    {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8, "lookahead": "step"},
]


def decode(model, tokens, spec, prompt_len, device, graph_form):
    from engine.graphs import GraphedDecoder
    policies = build_policies(ARGS, spec, tokens.shape[1], device, torch.float32)
    out = [model.prefill(tokens[:, :prompt_len].to(device), policies)]
    graphed = GraphedDecoder(model, policies, device) if graph_form == "graph" else None
    for p in range(prompt_len, tokens.shape[1]):
        tok = tokens[:, p].to(device)
        if graph_form == "eager":
            out.append(model.decode_step(tok, p, policies))
        elif graph_form == "tensor":  # the graph form run eagerly: device position + advance()
            out.append(model.decode_step(tok, torch.tensor([p], device=device), policies))
            for pol in policies:
                pol.advance()
        else:
            out.append(graphed.step(tok, p).clone())
    return torch.stack(out).cpu(), policies


@pytest.fixture(scope="module")
def model_and_tokens():
    model = Llama.random(ARGS, "cpu", torch.float32, seed=7)
    tokens = torch.randint(0, 300, (1, 140), generator=torch.Generator().manual_seed(0))
    return model, tokens


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["policy"] + "-" + s.get("lookahead", ""))
def test_graph_form_equals_eager(model_and_tokens, spec):
    model, tokens = model_and_tokens
    eager, pe = decode(model, tokens, spec, 100, "cpu", "eager")
    tensor, pt = decode(model, tokens, spec, 100, "cpu", "tensor")
    assert torch.equal(eager, tensor)
    assert [p.length for p in pe] == [p.length for p in pt] == [140] * ARGS.n_layers
    assert [p.transfer_bytes() for p in pe] == [p.transfer_bytes() for p in pt]


def test_quant_and_decode_eviction_are_not_graphable():
    pols = build_policies(ARGS, [{"policy": "quant", "bits": 4, "group": 32, "residual": 32},
                                 {"policy": "evict", "budget": 40, "evict_during_decode": True},
                                 {"policy": "full"}], 100, "cpu", torch.float32)
    assert [p.graphable for p in pols] == [False, False, True]


DENSE_CHECK = r"""
import torch
from kernels.dense_attn import dense_decode_attention_ref, dense_decode_attention_triton
bad = 0
for B, H, H_kv, D, N, n, splits in [(1, 4, 2, 32, 100, 37, None), (2, 6, 3, 64, 300, 300, 4),
                                    (1, 8, 8, 16, 80, 1, 3), (1, 32, 8, 128, 200, 150, 5)]:
    g = torch.Generator().manual_seed(N + n)
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, H_kv, N, D, generator=g), torch.randn(B, H_kv, N, D, generator=g)
    ref = dense_decode_attention_ref(q, k, v, torch.tensor([n]))
    tri = dense_decode_attention_triton(q, k, v, torch.tensor([n]), n_splits=splits)
    if not torch.allclose(ref, tri, rtol=1e-4, atol=1e-5):
        bad += 1
        print("MISMATCH", B, H, H_kv, D, N, n, (ref - tri).abs().max().item())
print("cases failed:", bad)
"""


def test_dense_decode_triton_matches_reference():
    """Includes a length of 1, splits past the live length (empty), GQA groups of 1..4."""
    check_interpreted(DENSE_CHECK)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["policy"] + "-" + s.get("lookahead", ""))
def test_cuda_graph_replay_equals_eager(model_and_tokens, spec):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CUDA graphs)")
    model, tokens = model_and_tokens
    gpu = Llama.random(ARGS, "cpu", torch.float32, seed=7).to("cuda")
    eager, _ = decode(gpu, tokens, spec, 100, "cuda", "eager")
    graph, pols = decode(gpu, tokens, spec, 100, "cuda", "graph")
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
    assert [p.length for p in pols] == [140] * ARGS.n_layers
