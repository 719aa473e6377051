"""Prefill in query chunks: the same logits as one chunk, and transient memory that grows with the
prompt only by the residual stream (and the layer's K/V that its policy receives), with a peak
that ModelArgs.prefill_bytes predicts for every policy (what LLM.check_kv_fits refuses with)."""
import pytest
import torch

from engine.config import preset
from engine.eval.live_bytes import LiveBytes
from engine.kv import build_policies
from engine.model import Llama
from kernels.prefill_attn import chunk_attention, lower_right_attention
from helpers import TINY
from stepping import decode_logits


def masked_reference(q, k, v):
    """Plain attention with an explicit bottom-right causal mask (B, H, C, D) -> (B, H, C, D)."""
    C, S, rep = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
    scores = q.float() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, H, C, S)
    pos_q = torch.arange(S - C, S)[:, None]
    scores = scores.masked_fill(torch.arange(S)[None, :] > pos_q, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("C,S", [(1, 1), (5, 5), (1, 9), (7, 20), (16, 17), (3, 300)])
def test_chunk_attention_matches_masked_reference(C, S):
    g = torch.Generator().manual_seed(C * 1000 + S)
    q = torch.randn(2, 4, C, 32, generator=g)
    k, v = torch.randn(2, 2, S, 32, generator=g), torch.randn(2, 2, S, 32, generator=g)
    ref = masked_reference(q, k, v)
    assert torch.allclose(chunk_attention(q, k, v), ref, atol=1e-5)
    assert torch.allclose(lower_right_attention(q, k, v), ref, atol=1e-5)  # the CUDA path's bias


def test_chunk_attention_bfloat16():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 8, 32, generator=g).bfloat16()
    k, v = torch.randn(1, 1, 40, 32, generator=g).bfloat16(), torch.randn(1, 1, 40, 32, generator=g).bfloat16()
    out = chunk_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), masked_reference(q, k, v), atol=2e-2)


@pytest.fixture(scope="module")
def tiny_model():
    return Llama.random(TINY, "cpu", torch.float32, seed=3)


@pytest.mark.parametrize("chunk", [1, 7, 64, 200])
def test_chunked_prefill_equals_one_chunk(tiny_model, chunk):
    tokens = torch.randint(0, TINY.vocab_size, (1, 200), generator=torch.Generator().manual_seed(4))
    logits = [tiny_model.prefill(tokens, build_policies(TINY, {"policy": "full"}, 200, "cpu", torch.float32),
                                 chunk=c, all_logits=True) for c in (200, chunk)]
    assert (logits[0] - logits[1]).abs().max().item() <= 2e-5


@pytest.mark.parametrize("spec", [{"policy": "evict", "budget": 48, "window": 16},
                                  {"policy": "offload", "budget": 48, "sink": 4, "recent": 8},
                                  {"policy": "quant", "bits": 2, "residual": 32}])
def test_policies_see_the_same_prompt_in_chunks(tiny_model, spec):
    """Evict and offload score the prompt with its last queries: a chunk of 8 splits those 32
    queries over four chunks, and the kept tokens, hence the decode logits, must not change."""
    tokens = torch.randint(0, TINY.vocab_size, (1, 160), generator=torch.Generator().manual_seed(5))
    whole, _ = decode_logits(tiny_model, tokens, spec, 150)
    chunked, _ = decode_logits(tiny_model, tokens, spec, 150, chunk=8)
    assert (whole - chunked).abs().max().item() <= 1e-4


def test_live_bytes_counts_a_peak():
    with LiveBytes() as lb:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # + 4000
        del a, b
        c = torch.ones(500)  # 2000, after both were freed
    assert (lb.peak, lb.now) == (8000, 2000)
    del c
    w = torch.ones(1000)  # made before the mode: a view of it under the mode allocates nothing
    with LiveBytes() as lb:
        head = w.view(10, 100).t()[:5]
        w.mul_(2)
        rows = head[[0, 1]]  # an index copies: 2 x 10 floats
    assert (lb.peak, lb.now) == (80, 80) and rows.shape == (2, 10)
    out = torch.empty(0)
    with LiveBytes() as lb:
        torch.matmul(w.view(10, 100), w.view(100, 10), out=out)  # an out= argument resized: allocated
    assert lb.now == 400


def test_prefill_transient_memory_grows_only_by_the_residual_stream():
    """16k vs 32k tokens on a one-layer model shaped like Llama-3.1-8B's attention (4 query heads
    per KV head, dim = H * D). Transient = peak - what the KV cache keeps afterwards. The residual
    stream x grows by 16k rows, the layer's K/V by half that (GQA), the RoPE tables a little;
    attention over all queries at once would add queries, output and its copy (measured before
    query chunking: +54 MiB here, against the 16 MiB allowed)."""
    args = preset("tiny", vocab_size=256, n_layers=1, n_heads=4, n_kv_heads=1, dim=128)
    model = Llama.random(args, "cpu", torch.float32)
    transient = {}
    for T in (16384, 32768):
        policies = build_policies(args, {"policy": "full"}, T + 1, "cpu", torch.float32)
        tokens = torch.randint(0, args.vocab_size, (1, T))
        with LiveBytes() as lb:
            model.prefill(tokens, policies)
        transient[T] = lb.peak - lb.now  # lb.now: the FullKV cache and the logits, kept
        # the up-front check (LLM.check_kv_fits) counts the cache beside the prefill's estimate: at
        # the peak, which is here FullKV's copy of the layer's K/V, the two hold what is alive
        assert args.prefill_bytes(T, 4) <= lb.peak <= args.prefill_bytes(T, 4) + lb.now, (T, lb.peak)
    residual_32k = 32768 * args.dim * 4
    assert transient[32768] - transient[16384] <= residual_32k, transient


# Llama-3.1-8B's proportions at an eighth of its width: head_dim 128, 4 query heads per KV head,
# ffn 3.5 x dim, so a prefill chunk's activations are 33 times one token's K and V, as there.
EIGHTH = dict(vocab_size=256, n_layers=1, n_heads=4, n_kv_heads=1, dim=512, ffn_dim=1792)


F32 = torch.float32


@pytest.mark.parametrize("spec, dtype", [({"policy": "evict", "budget": 0.2}, F32),
                                         ({"policy": "offload", "budget": 2048}, F32),
                                         ({"policy": "offload", "budget": 0.2, "chunk": 16, "host": "model"}, F32),
                                         ({"policy": "quant", "bits": 4}, F32), ({"policy": "quant", "bits": 2}, F32),
                                         ({"policy": "quant", "bits": 1}, F32),
                                         ({"policy": "quant", "bits": 4}, torch.bfloat16)])
def test_prefill_peak_is_the_estimate_for_every_policy(spec, dtype):
    """The policies score, rotate, quantize and copy the prompt in blocks of at most 8192 tokens,
    after the chunks' activations are freed, and stay below them: the peak is the model's own,
    which ModelArgs.prefill_bytes counts, plus nothing the policy does not keep. And their
    temporaries do not grow with the prompt: 8k -> 16k adds no more than the estimate does. Before
    the blocks (evict's softmax over all keys, 2-bit QuantKV's 9 range candidates of 2048 tokens,
    its clip search in 16 MB slices) the peak was up to 1.2x the estimate here. In bfloat16 the
    chunk's activations halve but the CPU quantizers still work in float32: QuantKV's blocks of
    8192 tokens exceeded them (4096 do not)."""
    args = preset("tiny", **EIGHTH)
    model = Llama.random(args, "cpu", dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    transient = {}
    for T in (8192, 16384):
        s = {k: int(v * T) if isinstance(v, float) else v for k, v in spec.items()}
        policies = build_policies(args, s, T + 1, "cpu", dtype)
        with LiveBytes() as lb:
            model.prefill(torch.randint(0, args.vocab_size, (1, T)), policies)
        estimate = args.prefill_bytes(T, elem)
        assert estimate <= lb.peak <= estimate + lb.now, (T, lb.peak, estimate, lb.now)  # lb.now: kept
        transient[T] = lb.peak - lb.now
    growth = args.prefill_bytes(16384, elem) - args.prefill_bytes(8192, elem)
    assert transient[16384] - transient[8192] <= growth, transient


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the fused bottom-right kernel")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float32, 1e-3)])  # float32: group by group
def test_chunked_prefill_on_cuda(dtype, tol):
    args = preset("tiny", vocab_size=256, n_heads=8, n_kv_heads=2, dim=512)
    model = Llama.random(args, "cuda", dtype)
    tokens = torch.randint(0, 256, (1, 3000), device="cuda")
    logits = [model.prefill(tokens, build_policies(args, {"policy": "full"}, 3000, "cuda", dtype),
                            chunk=c, all_logits=True).float() for c in (3000, 512)]
    assert (logits[0] - logits[1]).abs().max().item() <= tol * logits[0].abs().max().item()
