"""Prefill in query chunks: the same logits as one chunk, and transient memory that grows with the
prompt only by the residual stream (and the layer's K/V that its policy receives)."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine.config import preset
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


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that torch ops create while active, alive at each moment,
    and their peak: an exact, allocator-independent measure of a computation's memory on CPU."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:  # a new allocation (views share their base's)
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out


def test_live_bytes_counts_a_peak():
    with LiveBytes() as lb:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # + 4000
        del a, b
        c = torch.ones(500)  # 2000, after both were freed
    assert (lb.peak, lb.now) == (8000, 2000)
    del c


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
        # the up-front check's floor (LLM.check_kv_fits) is one, and a close one at this length
        assert 0.8 * transient[T] <= args.prefill_bytes(T, 4) <= transient[T], (T, transient)
    residual_32k = 32768 * args.dim * 4
    assert transient[32768] - transient[16384] <= residual_32k, transient


@pytest.mark.parametrize("spec", [{"policy": "quant", "bits": 4}, {"policy": "evict", "budget": 512},
                                  {"policy": "offload", "budget": 256}])
def test_prefill_floor_holds_for_every_policy(spec):
    """ModelArgs.prefill_bytes is a floor whatever the policy: each adds its own temporaries."""
    args = preset("tiny", vocab_size=256, n_layers=1, n_heads=4, n_kv_heads=1, dim=128)
    model = Llama.random(args, "cpu", torch.float32)
    policies = build_policies(args, spec, 4097, "cpu", torch.float32)
    with LiveBytes() as lb:
        model.prefill(torch.randint(0, args.vocab_size, (1, 4096)), policies)
    assert args.prefill_bytes(4096, 4) <= lb.peak - lb.now


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the fused bottom-right kernel")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float32, 1e-3)])  # float32: group by group
def test_chunked_prefill_on_cuda(dtype, tol):
    args = preset("tiny", vocab_size=256, n_heads=8, n_kv_heads=2, dim=512)
    model = Llama.random(args, "cuda", dtype)
    tokens = torch.randint(0, 256, (1, 3000), device="cuda")
    logits = [model.prefill(tokens, build_policies(args, {"policy": "full"}, 3000, "cuda", dtype),
                            chunk=c, all_logits=True).float() for c in (3000, 512)]
    assert (logits[0] - logits[1]).abs().max().item() <= tol * logits[0].abs().max().item()
