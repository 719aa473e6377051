"""OffloadKV: exact when the budget covers the prompt, reuse never changes results, approximate
scores kernel vs reference, CUDA prefetcher checks (skipped without a GPU), bad params."""
import pytest
import torch

from engine.config import preset
from engine.kv.offload import OffloadKV
from engine.model import Llama
from interpreted import check_compiled, check_interpreted
from stepping import attend_next, decode_logits
from kernels.sparse_attn import approx_scores_ref, select_topk

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
    dev = 2 * H * (48 + 1) * D * 4 + H * M * 8 * 4 + H * 8 * 8 + H * 32 * 8  # buffer, sketch, chan, selected
    for host, elem, ranges in (("model", 4, 0), ("8bit", 1, 4 * H * D * 4)):  # 8-bit: step, min of K, V
        _, policies = decode_logits(model, tokens[:, :101], {**spec, "host": host}, 100)
        assert policies[0].nbytes() == {"device": dev + ranges, "host": 2 * H * M * D * elem}


def test_chunk_bounds_hold_every_token():
    """The chunk score is an upper bound of q[C].k[C] for each of its tokens, exact with chunk 1."""
    from engine.kv.offload import chunk_sketch
    from kernels.sparse_attn import sketch_scores
    g = torch.Generator().manual_seed(3)
    k, q = torch.randn(1, 2, 96, 32, generator=g), torch.randn(1, 2, 5, 32, generator=g)
    chan = torch.tensor([[[0, 3, 5, 9, 11, 20, 30, 31]] * 2])
    qc = q.gather(-1, chan[:, :, None, :].expand(-1, -1, 5, -1))  # (1, 2, 5, 8)
    exact = qc @ k.gather(-1, chan[:, :, None, :].expand(-1, -1, 96, -1)).transpose(-1, -2)  # (1, 2, 5, 96)
    mn, mx = chunk_sketch(k, chan, 1)
    assert mn is mx and torch.allclose(sketch_scores(qc, mn, mx), exact, atol=1e-5)
    mn, mx = chunk_sketch(k, chan, 8)
    bound = sketch_scores(qc, mn, mx)  # (1, 2, 5, 12)
    per_chunk_max = exact.view(1, 2, 5, 12, 8).amax(-1)
    assert (bound >= per_chunk_max - 1e-5).all() and (bound > per_chunk_max + 1e-3).any()


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
    kc = mid.gather(-1, p.chan[:, :, None, :].expand(-1, -1, 88, -1)).view(1, 2, 22, c, 8)
    qc = q.reshape(1, 2, 2, 32).gather(-1, p.chan[:, :, None, :].expand(-1, -1, 2, -1))  # (1, 2, 2, 8)
    bound = (qc.clamp(min=0) @ kc.amax(3).transpose(-1, -2) + qc.clamp(max=0) @ kc.amin(3).transpose(-1, -2)).amax(2)
    want = bound.topk(6, -1).indices.sort(-1).values  # (1, 2, 6)
    assert torch.equal(p.slots.sort(-1).values, want)
    for h in range(2):
        for i, chunk in enumerate(p.slots[0, h].tolist()):
            rows = slice(S + i * c, S + (i + 1) * c)
            assert torch.equal(p.k[0, h, rows], mid[0, h, chunk * c:(chunk + 1) * c])
            assert torch.equal(p.v[0, h, rows], v[0, h, S + chunk * c:S + (chunk + 1) * c])
    assert torch.equal(p.k[0, :, S + 24:S + 24 + W + 3], k[0, :, T - W - 3:])  # recent + the 3 leftovers


def test_8bit_host_store_rounds_within_half_a_step():
    from kernels.prefetch import dequantize_channels, quantize_channels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 1000, 16, generator=g) * torch.logspace(-2, 1, 16)  # channels of very different scale
    x[0, 1, :, 5] = 0.25  # a constant channel
    codes, step, mn = quantize_channels(x, block=300)  # blocks that do not divide M
    assert codes.dtype == torch.uint8 and step.shape == mn.shape == (6, 16)
    back = dequantize_channels(codes, step, mn)
    assert ((back - x).abs() <= step.view(2, 3, 1, 16) * (0.5 + 1e-4)).all()
    assert torch.equal(back[0, 1, :, 5], x[0, 1, :, 5])
    assert codes.amin() == 0 and codes.amax() == 255  # each channel's range spans all 256 codes


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


def test_bad_parameters():
    with pytest.raises(ValueError, match="budget"):
        OffloadKV(ARGS, 0, 100, "cpu", torch.float32, budget=10, sink=8, recent=8)
    with pytest.raises(ValueError, match="chunk"):
        OffloadKV(ARGS, 0, 100, "cpu", torch.float32, chunk=0)
    with pytest.raises(ValueError, match="channels"):
        OffloadKV(ARGS, 0, 100, "cpu", torch.float32, channels=ARGS.head_dim + 1)
    with pytest.raises(ValueError, match="copy_programs"):
        OffloadKV(ARGS, 0, 100, "cpu", torch.float32, copy_programs=-1)
    with pytest.raises(ValueError, match="host"):
        OffloadKV(ARGS, 0, 100, "cpu", torch.float32, host="int4")


def test_offloaded_kv_beyond_host_memory_is_refused_up_front(monkeypatch):
    """On a GPU the offloaded rows live in pinned host memory: checked against what the host has
    free, in one line, before any work (the device side as always)."""
    import engine.api
    from engine import LLM
    from engine.kv import spec_cost
    llm = LLM("random:tiny", device="cpu")
    specs = llm.policy_specs("offload:budget=256")
    need = sum(spec_cost(llm.args, s, 4000, 32, 4)["host"] for s in specs)
    llm.device = torch.device("cuda")  # only the check runs: nothing is allocated there
    for free_host, ok in ((need, True), (need - 1, False)):
        monkeypatch.setattr(engine.api, "free_memory", lambda d: 1 << 40 if d.type == "cuda" else free_host)
        if ok:
            llm.check_kv_fits([(specs, 4000, 32)])
        else:
            with pytest.raises(ValueError, match=r"offloaded KV for 4000 \+ 32 tokens needs .* of host memory"):
                llm.check_kv_fits([(specs, 4000, 32)])


def test_select_topk_sorted_positions():
    scores = torch.tensor([[[0.1, 5.0, 0.3, 4.0, 0.2, 3.0]]])
    assert select_topk(scores, 3).tolist() == [[[1, 3, 5]]]


def test_approx_scores_reference_is_exact_with_all_channels():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 1, 32, generator=g), torch.randn(1, 2, 50, 32, generator=g)
    chan = torch.arange(32).expand(1, 2, 32)
    exact = (q.reshape(1, 2, 2, 32) @ k.transpose(-1, -2)).amax(2)
    torch.testing.assert_close(approx_scores_ref(q, k, k, chan), exact)


TRITON_CHECK = r"""
import torch
from engine.kv.offload import chunk_sketch
from kernels.sparse_attn import approx_scores_ref, approx_scores_triton
bad = 0
for B, H, H_kv, D, M, C in [(1, 4, 4, 64, 37, 8), (2, 9, 3, 64, 300, 8), (1, 32, 8, 128, 129, 16), (1, 8, 2, 128, 5, 4)]:
    g = torch.Generator().manual_seed(M)
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, H_kv, M, D, generator=g)
    chan = torch.rand(B, H_kv, D, generator=g).topk(C, -1).indices.sort(-1).values
    for c in (1, 4):  # token sketch (mn is mx), then chunks of 4 (min/max bounds)
        mn, mx = chunk_sketch(k[:, :, :M - M % c], chan, c)
        ref, tri = approx_scores_ref(q, mn, mx, chan), approx_scores_triton(q, mn, mx, chan)
        if not torch.allclose(ref, tri, rtol=1e-5, atol=1e-5):
            bad += 1
            print("MISMATCH", B, H, H_kv, D, M, C, c, (ref - tri).abs().max().item())
print("cases failed:", bad)
"""


def test_approx_scores_triton_matches_reference():
    check_interpreted(TRITON_CHECK)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (prefetcher streams)")


@cuda
@pytest.mark.parametrize("programs, host", [(0, "model"), (4, "model"), (0, "8bit")])
def test_cuda_fetch_equals_synchronous_copy(programs, host):
    """Zero-copy gather from pinned host memory, overlapped on the side stream (on every SM, or on
    4 programs walking all the blocks; from values or 8-bit codes) == plain indexing."""
    from kernels.prefetch import RowFetcher, gather_rows_ref
    k, v = torch.randn(1, 8, 4096, 128, device="cuda"), torch.randn(1, 8, 4096, 128, device="cuda")
    f = RowFetcher(k, v, "cuda", programs, host)
    tokens = torch.rand(1, 8, 4096, device="cuda").topk(256, -1).indices.sort(-1).values
    slots = torch.rand(1, 8, 256, device="cuda").argsort(-1)
    wanted = torch.rand(1, 8, 256, device="cuda") < 0.5
    got_k, got_v = torch.zeros(1, 8, 300, 128, device="cuda"), torch.zeros(1, 8, 300, 128, device="cuda")
    f.fetch(tokens, wanted, slots, got_k, got_v, 7, overlap=True)
    f.wait()
    want_k, want_v = torch.zeros_like(got_k), torch.zeros_like(got_v)
    src = (k.reshape(-1, 128), v.reshape(-1, 128)) if host == "model" else (f.src_k, f.src_v)
    gather_rows_ref(*src, tokens, wanted, slots, want_k, want_v, 7, ranges=f.ranges)
    tol = 0 if host == "model" else 1e-6  # min + step * code: one fused multiply-add on the GPU
    torch.testing.assert_close(got_k, want_k, rtol=tol, atol=tol)
    torch.testing.assert_close(got_v, want_v, rtol=tol, atol=tol)
    assert f.bytes_copied == int(wanted.sum()) * 2 * 128 * (4 if host == "model" else 1)


@cuda
def test_cuda_copy_overlaps_compute():
    """Events on both streams: the side-stream fetch is still running after compute queued behind it
    has started, i.e. copy and compute were in flight together."""
    from kernels.prefetch import RowFetcher
    M = 1 << 17
    k = torch.randn(1, 8, M, 128, device="cuda", dtype=torch.bfloat16)
    f = RowFetcher(k, k, "cuda")
    del k
    tokens = torch.arange(M, device="cuda").expand(1, 8, M).contiguous()  # 512 MiB of K+V to fetch
    dst = torch.empty(1, 8, M, 128, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    compute = torch.cuda.current_stream()
    for _ in range(2):  # the first round compiles the kernel
        copy_start, copy_end, mm_start = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        copy_start.record(f.stream)  # the side stream is idle: recorded now, before the fetch
        f.fetch(tokens, torch.ones_like(tokens, dtype=torch.bool), tokens, dst, dst, 0, overlap=True)
        copy_end.record(f.stream)
        mm_start.record(compute)
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        f.wait()
        torch.cuda.synchronize()
    assert copy_start.elapsed_time(copy_end) > 0
    assert mm_start.elapsed_time(copy_end) > 0  # the copy ended after the matmuls had begun


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


GATHER_CHECK = r"""
import os, torch
from kernels.prefetch import gather_rows_ref, gather_rows_triton
DEV = os.environ.get("KERNEL_TEST_DEVICE", "cpu")
bad = 0
for B, H_kv, M, D, K, n, off, dt in [(1, 2, 50, 32, 20, 40, 3, torch.float32), (2, 3, 300, 64, 77, 90, 0, torch.float32),
                                     (1, 8, 129, 128, 33, 40, 5, torch.bfloat16)]:
    g = torch.Generator().manual_seed(M)
    tokens = torch.rand(B, H_kv, M, generator=g).topk(K, -1).indices.sort(-1).values.to(DEV)
    slots = torch.rand(B, H_kv, K, generator=g).argsort(-1).to(DEV)
    wanted = (torch.rand(B, H_kv, K, generator=g) < 0.6).to(DEV)
    for codes in (False, True):  # the host store: values, or 8-bit codes with a step and min per channel
        if codes:
            src_k, src_v = (torch.randint(0, 256, (B * H_kv * M, D), generator=g, dtype=torch.uint8).to(DEV)
                            for _ in range(2))
            ranges = tuple((torch.rand(B * H_kv, D, generator=g) * f).to(DEV) for f in (0.1, -2, 0.05, 1))
        else:
            src_k, src_v = (torch.randn(B * H_kv * M, D, generator=g).to(DEV, dt) for _ in range(2))
            ranges = None
        for s in (slots, None):  # None: entry j goes to slot j
            # programs 0: one per block of 32 entries; 1 and 3: each program walks several blocks
            # (and heads), as a side-stream copy capped to a few SMs does
            for programs in (0, 1, 3):
                out = []
                for fn in (gather_rows_ref, lambda *a, **kw: gather_rows_triton(*a, programs=programs, **kw)):
                    dk, dv = (torch.zeros(B, H_kv, n, D, device=DEV, dtype=dt) for _ in range(2))
                    fn(src_k, src_v, tokens, wanted, s, dk, dv, off, ranges=ranges)
                    out.append((dk, dv))
                # Codes are widened in float32 then rounded to dst's dtype: compiled on a GPU, min +
                # step * code may be one fused multiply-add (1 float32 ulp), and the interpreter rounds
                # float32 to bfloat16 toward zero where torch (and a GPU) round to nearest (1 ulp)
                tol = 1e-2 if dt == torch.bfloat16 else 1e-6
                same = (lambda a, b: torch.allclose(a.float(), b.float(), rtol=tol, atol=1e-6)) \
                    if codes and (DEV != "cpu" or dt == torch.bfloat16) else torch.equal
                if not (same(out[0][0], out[1][0]) and same(out[0][1], out[1][1])) or out[0][0].eq(0).all():
                    bad += 1
                    print("MISMATCH", B, H_kv, M, D, K, s is None, programs, codes)
print("cases failed:", bad)
"""


def test_gather_rows_triton_matches_reference():
    check_interpreted(GATHER_CHECK)


@cuda
def test_gather_rows_compiled_matches_reference():
    check_compiled(GATHER_CHECK)


def _assign_by_hand(slots: list[int], new: list[int]) -> tuple[list[int], list[bool]]:
    """kernels/slots.py's rule, one head, in plain Python: kept slots stay, the free ones (in slot
    order) take the chunks no slot holds (in id order)."""
    absent = iter(c for c in new if c not in slots)
    kept = [c in new for c in slots]
    return [c if keep else next(absent) for c, keep in zip(slots, kept)], [not keep for keep in kept]


def _slot_cases():
    """(slots, new) pairs: the docstring's example, a first step (every slot free, -1), nothing
    changing, everything changing, and random overlaps, with k from 1 to 37."""
    g = torch.Generator().manual_seed(0)
    yield torch.tensor([[[7, 2, 9, 4]]]), torch.tensor([[[2, 4, 5, 8]]])
    yield torch.full((1, 2, 5), -1), torch.tensor([[[0, 3, 4, 8, 9], [1, 2, 3, 4, 5]]])
    yield torch.tensor([[[3, 1, 2]]]), torch.tensor([[[1, 2, 3]]])
    yield torch.tensor([[[3, 1, 2]]]), torch.tensor([[[4, 5, 6]]])
    for B, H, k, N in [(1, 1, 1, 3), (2, 3, 8, 20), (1, 4, 37, 60), (2, 2, 16, 17)]:
        slots = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B * H)]).view(B, H, k)
        new = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B * H)]).view(B, H, k).sort(-1).values
        yield slots, new


@pytest.mark.parametrize("chunk", [1, 4])
def test_assign_slots_reference_follows_the_rule(chunk):
    from kernels.slots import assign_slots_ref
    for slots, new in _slot_cases():
        for reuse in (True, False):
            s = slots.clone()
            rows, wanted = assign_slots_ref(s, new, chunk, reuse)
            for b, h in [(b, h) for b in range(new.shape[0]) for h in range(new.shape[1])]:
                want_slots, fresh = _assign_by_hand(slots[b, h].tolist(), new[b, h].tolist())
                assert s[b, h].tolist() == want_slots and sorted(want_slots) == new[b, h].tolist()
                assert rows[b, h].tolist() == [c * chunk + r for c in want_slots for r in range(chunk)]
                assert wanted[b, h].tolist() == [f or not reuse for f in fresh for _ in range(chunk)]


SLOTS_CHECK = r"""
import os, torch
from test_offloadkv import _slot_cases
from kernels.slots import assign_slots, assign_slots_ref, assign_slots_triton
bad = n = 0
for slots, new in _slot_cases():
    for chunk in (1, 3, 16):
        for reuse in (True, False):
            a, b = slots.clone(), slots.clone()
            ra, wa = assign_slots_ref(a, new, chunk, reuse)
            rb, wb = assign_slots_triton(b, new, chunk, reuse)
            n += 1
            if not (torch.equal(a, b) and torch.equal(ra, rb) and torch.equal(wa, wb)):
                bad += 1
                print("MISMATCH", slots.shape, chunk, reuse, a.tolist(), b.tolist())
os.environ["LAYERKV_KERNELS"] = "triton"
slots, new = torch.tensor([[[7, 2, 9, 4]]]), torch.tensor([[[2, 4, 5, 8]]])
assign_slots(slots, new, 1)
if slots.tolist() != [[[5, 2, 8, 4]]]:
    bad += 1
    print("FAIL dispatch", slots.tolist())
print(n, "cases, cases failed:", bad)
"""


def test_assign_slots_triton_matches_reference():
    check_interpreted(SLOTS_CHECK)


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
