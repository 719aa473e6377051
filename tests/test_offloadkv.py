"""OffloadKV: exact when the budget covers the prompt, reuse never changes results, chunk bounds and
selection, the layout, channel ranking, bytes, the 8-bit host store's error, lookahead modes,
approximate scores kernel vs reference, the CUDA path == the CPU path (skipped without a GPU), bad
parameters. The row fetching and slot assignment kernels: tests/test_prefetch.py, tests/test_slots.py."""
import pytest
import torch

from engine.config import preset
from engine.kv import build_policies, spec_cost
from engine.kv.offload import OffloadKV, rank_channels
from engine.model import Llama
from interpreted import check_interpreted
from stepping import attend_next, decode_logits
from kernels.sparse_attn import _dot, _pack, approx_scores_ref, make_sketch, select_topk, sketch_bytes, sketch_scores

ARGS = preset("tiny", vocab_size=300, n_heads=4, n_kv_heads=2, dim=128, n_layers=3)  # head_dim 32


@pytest.fixture(scope="module")
def model_and_tokens():
    model = Llama.random(ARGS, "cpu", torch.float32, seed=7)
    tokens = torch.randint(0, 300, (1, 160), generator=torch.Generator().manual_seed(0))
    return model, tokens


@pytest.mark.parametrize("budget, chunk", [(120, 1), (500, 1), (120, 16)])
def test_budget_covering_prompt_equals_fullkv(model_and_tokens, budget, chunk):
    model, tokens = model_and_tokens
    full, _ = decode_logits(model, tokens, {"policy": "full"}, 120)
    off, policies = decode_logits(model, tokens, {"policy": "offload", "budget": budget, "sink": 4,
                                                "recent": 16, "channels": 8, "chunk": chunk}, 120)
    assert torch.equal(full, off)
    assert policies[0].nbytes()["host"] == 0


@pytest.mark.parametrize("chunk", [1, 4])
def test_reuse_never_changes_results(model_and_tokens, chunk):
    model, tokens = model_and_tokens
    spec = {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8, "chunk": chunk}
    with_reuse, pol_a = decode_logits(model, tokens, {**spec, "reuse": True}, 100)
    without, pol_b = decode_logits(model, tokens, {**spec, "reuse": False}, 100)
    assert torch.equal(with_reuse, without)
    moved_a = sum(p.fetcher.bytes_copied for p in pol_a)
    moved_b = sum(p.fetcher.bytes_copied for p in pol_b)
    assert 0 < moved_a < moved_b  # reuse copies strictly less once selections overlap
    full, _ = decode_logits(model, tokens, {"policy": "full"}, 100)
    assert not torch.equal(full, with_reuse)  # the budget really bites (84 middle tokens, 32 kept)


def test_device_and_host_bytes(model_and_tokens):
    model, tokens = model_and_tokens
    spec = {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8}
    D, H = ARGS.head_dim, ARGS.n_kv_heads
    M = 100 - 4 - 12
    # buffer; sketch: 4 bytes of codes per token, base, step (float32) and id (int64) per channel; selected
    dev = 2 * H * (48 + 1) * D * 4 + H * M * 4 + H * 8 * (4 + 4 + 8) + H * 32 * 8
    for host, elem, ranges in (("model", 4, 0), ("8bit", 1, 4 * H * D * 4)):  # 8-bit: step, min of K, V
        _, policies = decode_logits(model, tokens[:, :101], {**spec, "host": host}, 100)
        assert policies[0].nbytes() == {"device": dev + ranges, "host": 2 * H * M * D * elem}
        # after the prefill alone (max_new_tokens 1: no decode step) too, as the planner prices it
        policies = build_policies(ARGS, {**spec, "host": host}, 101, "cpu", torch.float32)
        model.prefill(tokens[:, :100], policies)
        assert policies[0].nbytes() == spec_cost(ARGS, {**spec, "host": host}, 100, 1, 4) == \
            {"device": dev + ranges, "host": 2 * H * M * D * elem}


def test_chunk_bounds_hold_every_token():
    """The 4-bit chunk score is an upper bound of the exact q[C].k[C] of each of its tokens; with
    chunk 1 it is q[C].k[C] within half a grid step per channel."""
    g = torch.Generator().manual_seed(3)
    k, q = torch.randn(1, 2, 96, 32, generator=g), torch.randn(1, 2, 5, 32, generator=g)
    chan = torch.tensor([[[0, 3, 5, 9, 11, 20, 30, 31]] * 2])
    qc = q.gather(-1, chan[:, :, None, :].expand(-1, -1, 5, -1))  # (1, 2, 5, 8)
    exact = qc @ k.gather(-1, chan[:, :, None, :].expand(-1, -1, 96, -1)).transpose(-1, -2)  # (1, 2, 5, 96)
    sk = make_sketch(k, chan, 1)
    assert sk.lo is sk.hi and sk.hi.shape == (1, 2, 96, 4) and sk.hi.dtype == torch.uint8
    half_steps = (qc.abs() * sk.step[:, :, None]).sum(-1, keepdim=True) / 2  # (1, 2, 5, 1)
    err = (sketch_scores(qc, sk) - exact).abs()
    assert (err <= half_steps + 1e-5).all() and err.max() > 1e-3  # rounded, never by more
    sk = make_sketch(k, chan, 8)
    bound = sketch_scores(qc, sk)  # (1, 2, 5, 12)
    per_chunk_max = exact.view(1, 2, 5, 12, 8).amax(-1)
    assert (bound >= per_chunk_max - 1e-5).all() and (bound > per_chunk_max + 1e-3).any()


def unpack(packed, channels):
    """(..., ceil(C/2)) uint8 -> (..., C) codes, as the scoring reads them: _dot with the identity."""
    return _dot(torch.eye(channels), packed).transpose(-1, -2)


def test_sketch_codes_pack_two_channels_a_byte():
    """Byte j holds channel j in its low nibble and channel j + ceil(C/2) in its high one (the
    module docstring's example); an odd C leaves the last high nibble 0."""
    codes = torch.tensor([[3, 7, 0, 15]])
    assert _pack(codes).tolist() == [[3, 247]]
    assert unpack(_pack(codes), 4).tolist() == [[3.0, 7.0, 0.0, 15.0]]
    odd = torch.tensor([[1, 2, 3, 4, 5]])
    assert _pack(odd).tolist() == [[1 | 4 << 4, 2 | 5 << 4, 3]] and unpack(_pack(odd), 5).tolist() == [[1, 2, 3, 4, 5]]
    # a channel whose keys are all equal gets step 1 and code 0: exact
    k = torch.zeros(1, 1, 6, 4)
    k[..., 1] = torch.arange(6.0)
    sk = make_sketch(k, torch.tensor([[[0, 1]]]), 1)
    assert sk.step[0, 0].tolist() == [1.0, pytest.approx(5 / 15)] and unpack(sk.hi, 2)[0, 0, :, 1].tolist() == [0, 3, 6, 9, 12, 15]


def test_chunks_are_selected_by_their_bound_and_copied_whole():
    """One decode step at chunk 4: the slots hold the top chunks by the brute-force bound, computed
    here from the full keys, and each slot's rows are its chunk's keys and values in order."""
    g = torch.Generator().manual_seed(4)
    T, S, W, c = 103, 4, 8, 4  # middle 91 = 22 chunks + 3 tokens handed to the recent part
    k, v = torch.randn(1, 2, T, 32, generator=g), torch.randn(1, 2, T, 32, generator=g)
    p = OffloadKV(ARGS, 0, T + 1, "cpu", torch.float32, budget=S + W + 24, sink=S, recent=W, channels=8, chunk=c,
                  host="model")
    p.prefill(k, v, torch.randn(1, 4, 32, 32, generator=g))
    assert (p.M, p.top) == (88, 24)  # 6 chunks of 4 selected
    q = torch.randn(1, 4, 1, 32, generator=g)
    attend_next(p, q, k[:, :, :1], v[:, :, :1])
    mid = k[:, :, S:S + 88]
    chan, base, step = p.sketch.chan, p.sketch.base[:, :, None], p.sketch.step[:, :, None]  # (1, 2, 1, 8)
    kc = mid.gather(-1, chan[:, :, None, :].expand(-1, -1, 88, -1)).view(1, 2, 22, c, 8)
    grid_lo = torch.floor((kc.amin(3) - base) / step) * step + base  # (1, 2, 22, 8) the chunk's range, widened
    grid_hi = torch.ceil((kc.amax(3) - base) / step) * step + base   # to the 4-bit grid
    qc = q.reshape(1, 2, 2, 32).gather(-1, chan[:, :, None, :].expand(-1, -1, 2, -1))  # (1, 2, 2, 8)
    bound = (qc.clamp(min=0) @ grid_hi.transpose(-1, -2) + qc.clamp(max=0) @ grid_lo.transpose(-1, -2)).amax(2)
    want = bound.topk(6, -1).indices.sort(-1).values  # (1, 2, 6)
    assert torch.equal(p.slots.sort(-1).values, want)
    for h in range(2):
        for i, chunk in enumerate(p.slots[0, h].tolist()):
            rows = slice(S + i * c, S + (i + 1) * c)
            assert torch.equal(p.k[0, h, rows], mid[0, h, chunk * c:(chunk + 1) * c])
            assert torch.equal(p.v[0, h, rows], v[0, h, S + chunk * c:S + (chunk + 1) * c])
    assert torch.equal(p.k[0, :, S + 24:S + 24 + W + 3], k[0, :, T - W - 3:])  # recent + the 3 leftovers


def test_8bit_host_store_decodes_close_to_the_model_values(model_and_tokens):
    """A quarter of float32's bytes per fetched row, and an error far below OffloadKV's own (what
    its budget leaves out): here 2.4e-4 mean |logit difference| against 0.046 from FullKV."""
    model, tokens = model_and_tokens
    spec = {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8}
    exact, pol_a = decode_logits(model, tokens, {**spec, "host": "model"}, 100)
    coded, pol_b = decode_logits(model, tokens, spec, 100)  # the default host store: 8-bit codes
    full, _ = decode_logits(model, tokens, {"policy": "full"}, 100)
    assert pol_b[0].nbytes()["host"] * 4 == pol_a[0].nbytes()["host"]
    assert pol_b[0].fetcher.row_bytes * 4 == pol_a[0].fetcher.row_bytes
    assert not torch.equal(exact, coded)
    assert (coded - exact).abs().mean() < 0.02 * (exact - full).abs().mean()
    assert (coded.argmax(-1) == exact.argmax(-1)).float().mean() > 0.95


def test_default_sketch_is_a_quarter_of_head_dim(model_and_tokens):
    """channels=0 (the default) is head_dim // 4: 8 of ARGS' 32; priced and held the same."""
    model, tokens = model_and_tokens
    spec = {"policy": "offload", "budget": 48, "sink": 4, "recent": 12}
    _, policies = decode_logits(model, tokens[:, :101], spec, 100)
    assert policies[0].channels == 8 and policies[0].sketch.chan.shape == (1, 2, 8)
    assert policies[0].describe()["channels"] == 8
    assert policies[0].nbytes() == spec_cost(ARGS, spec, 100, 1, 4) == spec_cost(ARGS, {**spec, "channels": 8}, 100, 1, 4)


def test_layout_keeps_whole_chunks():
    """layout: sink, middle, recent and the middle tokens held on the device, in whole chunks; the
    middle's last tokens that do not fill a chunk join the recent part."""
    # 103 tokens, sink 4, recent 8: a middle of 91 = 22 chunks of 4 + 3 tokens; 27 on the device = 6 chunks
    assert OffloadKV.layout(103, 4 + 8 + 27, 4, 8, 4) == (4, 88, 11, 24)
    assert OffloadKV.layout(103, 4 + 8 + 27, 4, 8, 1) == (4, 91, 8, 27)
    assert OffloadKV.layout(103, 4 + 8 + 91, 4, 8, 4) == (4, 91, 8, 91)  # the whole middle fits: nothing offloaded
    assert OffloadKV.layout(10, 4 + 8 + 27, 4, 8, 4) == (4, 0, 6, 0)  # shorter than sink + recent


def test_sketch_bytes_prices_what_make_sketch_holds():
    """The planner prices a sketch from shapes alone (sketch_bytes); it must equal what make_sketch
    builds, an odd channel count included (its last code sits alone in a byte)."""
    mid_k = torch.randn(1, 2, 24, 32, generator=torch.Generator().manual_seed(5))
    for C in (5, 8):
        chan = torch.arange(C).expand(1, 2, C).contiguous()
        for chunk in (1, 4):
            assert make_sketch(mid_k, chan, chunk).nbytes() == sketch_bytes(2, 24 // chunk, C, chunk > 1), (C, chunk)


def test_rank_channels_by_key_magnitude_and_query_weight():
    """A channel ranks by max|K| over the middle (a large negative key counts as much as a large
    positive one), times the query's mean |q| over the window and the group when there is one."""
    k = torch.tensor([[1.0, -1.0, 0.5, 0.2], [-0.5, -9.0, 3.0, 0.1], [0.2, -2.0, -1.0, -0.1]])  # (M 3, D 4)
    mid_k = k.view(1, 1, 3, 4)
    assert rank_channels(mid_k, None, 2).tolist() == [[[1, 2]]]  # max|K|: 1, 9, 3, 0.2
    q = torch.tensor([1.0, 1.0, 1.0, 100.0]).expand(1, 2, 5, 4)  # (B, H 2, w 5, D): channel 3 weighs most
    assert rank_channels(mid_k, q, 2).tolist() == [[[1, 3]]]  # weights: 1, 9, 3, 20


def test_bad_parameters():
    with pytest.raises(ValueError, match="budget"):
        OffloadKV(ARGS, 0, 100, "cpu", torch.float32, budget=10, sink=8, recent=8)
    with pytest.raises(ValueError, match="chunk"):
        OffloadKV(ARGS, 0, 100, "cpu", torch.float32, chunk=0)
    with pytest.raises(ValueError, match="channels"):
        OffloadKV(ARGS, 0, 100, "cpu", torch.float32, channels=ARGS.head_dim + 1)
    with pytest.raises(ValueError, match="channels"):
        OffloadKV(ARGS, 0, 100, "cpu", torch.float32, channels=-1)
    with pytest.raises(ValueError, match="copy_programs"):
        OffloadKV(ARGS, 0, 100, "cpu", torch.float32, copy_programs=-1)
    with pytest.raises(ValueError, match="host"):
        OffloadKV(ARGS, 0, 100, "cpu", torch.float32, host="int4")


def test_offloaded_kv_beyond_host_memory_is_refused_up_front(monkeypatch):
    """On a GPU the offloaded rows live in pinned host memory: checked against what the host has
    free, in one line, before any work (the device side as always). Pinned blocks are rounded up
    to a power of two by torch's allocator, and the check counts that."""
    import engine.fit
    from engine import LLM
    from engine.kv import spec_cost
    llm = LLM("random:tiny", device="cpu")
    specs = llm.policy_specs("offload:budget=256")
    host = [spec_cost(llm.args, s, 4000, 32, 4)["host"] for s in specs]  # per layer, K + V tables
    need = sum(2 * (1 << (h // 2 - 1).bit_length()) for h in host)  # each table rounded up
    assert need > sum(host) and all(2 * (1 << (h // 2 - 1).bit_length()) < 2 * h for h in host)
    llm.device = torch.device("cuda")  # only the check runs: nothing is allocated there
    for free_host, ok in ((need, True), (need - 1, False)):
        monkeypatch.setattr(engine.fit, "free_memory", lambda d: 1 << 40 if d.type == "cuda" else free_host)
        if ok:
            llm.check_kv_fits([(specs, 4000, 32)])
        else:
            with pytest.raises(ValueError, match=r"offloaded KV for 4000 \+ 32 tokens needs .* of host memory"):
                llm.check_kv_fits([(specs, 4000, 32)])
    # Pinned blocks that torch's host cache keeps (a hybrid's calibration freed them) are given back
    # before the host's free memory is read: 1 byte short until they are, enough after.
    freed = []
    monkeypatch.setattr(engine.fit, "release_pinned_cache", lambda: freed.append(1 << 30))
    monkeypatch.setattr(engine.fit, "free_memory", lambda d: 1 << 40 if d.type == "cuda" else need - 1 + sum(freed))
    llm.check_kv_fits([(specs, 4000, 32)])
    assert freed


def test_release_pinned_cache_calls_torch_when_cuda_runs(monkeypatch):
    """torch's private host-cache release, where this build has it and CUDA is initialised (a CPU
    build has neither: then it does nothing)."""
    from kernels.host_store import release_pinned_cache
    calls = []
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: calls.append(1), raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    release_pinned_cache()
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    release_pinned_cache()
    assert calls == [1]
    monkeypatch.delattr(torch._C, "_host_emptyCache")
    release_pinned_cache()  # a build without it: nothing to do, no error


def test_select_topk_sorted_positions():
    scores = torch.tensor([[[0.1, 5.0, 0.3, 4.0, 0.2, 3.0]]])
    assert select_topk(scores, 3).tolist() == [[[1, 3, 5]]]


def test_approx_scores_reference_is_exact_on_the_grid():
    """Keys that lie on each channel's 4-bit grid are coded exactly: then every channel gives the
    exact q.k, and the score is the max over the KV head's query heads."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 32, generator=g)
    k = torch.randint(0, 16, (1, 2, 50, 32), generator=g).float() * 0.25 - 1.0  # base -1, step 0.25
    k[:, :, 0], k[:, :, 1] = -1.0, 2.75  # every channel spans the whole grid
    exact = (q.reshape(1, 2, 2, 32) @ k.transpose(-1, -2)).amax(2)
    torch.testing.assert_close(approx_scores_ref(q, make_sketch(k, torch.arange(32).expand(1, 2, 32), 1)), exact)


TRITON_CHECK = r"""
import torch
from kernels.sparse_attn import approx_scores_ref, approx_scores_triton, make_sketch
bad = 0
for B, H, H_kv, D, M, C in [(1, 4, 4, 64, 37, 16), (2, 9, 3, 64, 300, 8), (1, 32, 8, 128, 129, 32), (1, 8, 2, 128, 5, 4)]:
    g = torch.Generator().manual_seed(M)
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, H_kv, M, D, generator=g)
    chan = torch.rand(B, H_kv, D, generator=g).topk(C, -1).indices.sort(-1).values
    for c in (1, 4):  # token sketch (lo is hi), then chunks of 4 (min/max bounds)
        sk = make_sketch(k[:, :, :M - M % c], chan, c)
        ref, tri = approx_scores_ref(q, sk), approx_scores_triton(q, sk)
        if not torch.allclose(ref, tri, rtol=1e-5, atol=1e-5):
            bad += 1
            print("MISMATCH", B, H, H_kv, D, M, C, c, (ref - tri).abs().max().item())
print("cases failed:", bad)
"""


def test_approx_scores_triton_matches_reference():
    check_interpreted(TRITON_CHECK)


@pytest.mark.parametrize("lookahead", ["none", "layer", "step"])
def test_cuda_offload_matches_cpu_path(lookahead):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (prefetcher streams)")
    model_cpu = Llama.random(ARGS, "cpu", torch.float32, seed=7)
    model_gpu = Llama.random(ARGS, "cpu", torch.float32, seed=7).to("cuda")
    tokens = torch.randint(0, 300, (1, 160), generator=torch.Generator().manual_seed(0))
    spec = {"policy": "offload", "budget": 48, "sink": 4, "recent": 12, "channels": 8, "lookahead": lookahead}
    out = {name: decode_logits(m, tokens, spec, 100)[0] for name, m in [("cpu", model_cpu), ("cuda", model_gpu)]}
    assert (out["cpu"].argmax(-1) == out["cuda"].argmax(-1)).float().mean() > 0.95
    torch.testing.assert_close(out["cpu"], out["cuda"], rtol=1e-3, atol=1e-3)


def _policy(lookahead, k, v):
    p = OffloadKV(ARGS, 1, 100, "cpu", torch.float32, budget=24, sink=2, recent=6, channels=8,
                  lookahead=lookahead)
    p.prefill(k, v, None)
    return p


def test_lookahead_layer_attends_over_the_early_selection():
    """prepare(q) one layer early, then attend(q): the same as selecting with q at attend time;
    and a different early query changes which rows are attended."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 80, 32, generator=g), torch.randn(1, 2, 80, 32, generator=g)
    q, q_other = torch.randn(1, 4, 1, 32, generator=g), torch.randn(1, 4, 1, 32, generator=g)
    kn, vn = torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g)
    exact, early, wrong = _policy("none", k, v), _policy("layer", k, v), _policy("layer", k, v)
    out_exact = attend_next(exact, q, kn, vn)
    early.prepare(q)
    wrong.prepare(q_other)
    assert torch.equal(attend_next(early, q, kn, vn), out_exact)
    assert not torch.equal(attend_next(wrong, q, kn, vn), out_exact)


def test_lookahead_step_uses_the_previous_query():
    """In "step" mode step t attends over the rows chosen by step t-1's query (step 0 by its own):
    the same as "layer" mode handed that older query early."""
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 2, 80, 32, generator=g), torch.randn(1, 2, 80, 32, generator=g)
    qs = [torch.randn(1, 4, 1, 32, generator=g) for _ in range(4)]
    kvs = [(torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g)) for _ in range(4)]
    lagged, early, exact = _policy("step", k, v), _policy("layer", k, v), _policy("none", k, v)
    for t in range(4):
        got = attend_next(lagged, qs[t], *kvs[t])
        early.prepare(qs[max(t - 1, 0)])
        assert torch.equal(got, attend_next(early, qs[t], *kvs[t])), t
        same = torch.equal(got, attend_next(exact, qs[t], *kvs[t]))
        assert same == (t == 0), t  # from step 1 on the stale selection differs from the exact one
