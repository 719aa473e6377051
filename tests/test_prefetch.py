"""kernels/host_store.py and kernels/prefetch.py: OffloadKV's host store and row fetching. The
8-bit store's rounding; the zero-copy gather kernel against its reference (interpreted here;
compiled, from pinned memory, on the side stream and beside compute on a GPU: those skip without
one)."""
import pytest
import torch

from interpreted import check_compiled, check_interpreted


def test_8bit_host_store_rounds_within_half_a_step():
    from kernels.host_store import dequantize_channels, quantize_channels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 1000, 16, generator=g) * torch.logspace(-2, 1, 16)  # channels of very different scale
    x[0, 1, :, 5] = 0.25  # a constant channel
    codes, step, mn = quantize_channels(x, block=300)  # blocks that do not divide M
    assert codes.dtype == torch.uint8 and step.shape == mn.shape == (6, 16)
    back = dequantize_channels(codes, step, mn)
    assert ((back - x).abs() <= step.view(2, 3, 1, 16) * (0.5 + 1e-4)).all()
    assert torch.equal(back[0, 1, :, 5], x[0, 1, :, 5])
    assert codes.amin() == 0 and codes.amax() == 255  # each channel's range spans all 256 codes


def test_pinned_bytes_rounds_each_table_up_to_a_power_of_two():
    """torch's caching host allocator rounds every pinned block up to a power of two; the host
    check counts the store as it will be pinned: two tables, each rounded on its own."""
    from kernels.host_store import pinned_bytes
    table = 100_000 * 8 * 128  # the docstring's example: 102.4 MB of 8-bit codes per table
    assert pinned_bytes(2 * table) == 2 * 2**27  # 134 MB a table
    assert pinned_bytes(2 * 2**20) == 2 * 2**20  # a table of exactly 1 MiB is not doubled
    assert pinned_bytes(2 * (2**20 + 1)) == 2 * 2**21
    assert pinned_bytes(0) == 0


@pytest.mark.parametrize("host", ["model", "8bit"])
def test_host_store_is_filled_in_blocks(host, monkeypatch):
    """RowFetcher writes the store STORE_BLOCK tokens at a time (no whole copy or whole codes of the
    layer on the device): the same rows as one pass over a strided middle of K and V."""
    import kernels.prefetch as prefetch
    from kernels.host_store import quantize_channels
    monkeypatch.setattr(prefetch, "STORE_BLOCK", 7)  # blocks that do not divide M
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 3, 60, 16, generator=g), torch.randn(2, 3, 60, 16, generator=g)
    mid_k, mid_v = k[:, :, 5:55], v[:, :, 5:55]  # (2, 3, 50, 16), as OffloadKV hands it over
    f = prefetch.RowFetcher(mid_k, mid_v, "cpu", host=host)
    for got, x in ((f.host_k, mid_k), (f.host_v, mid_v)):
        want = x if host == "model" else quantize_channels(x)[0]
        assert torch.equal(got, want.reshape(300, 16))
    if host == "8bit":
        assert torch.equal(f.ranges[0], quantize_channels(mid_k)[1])
    assert f.row_bytes == 2 * 16 * (4 if host == "model" else 1)


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


PINNED_STAGES = r"""
import torch
from kernels.prefetch import RowFetcher
g = torch.Generator().manual_seed(0)
k, v = (torch.randn(1, 8, 4096, 128, generator=g).to(torch.bfloat16) for _ in range(2))
tokens = torch.rand(1, 8, 4096, generator=g).topk(500, -1).indices.sort(-1).values.cuda()
wanted = (torch.rand(1, 8, 500, generator=g) < 0.7).cuda()
got = []
for stages in (1, 3):
    f = RowFetcher(k, v, "cuda", programs=4, stages=stages)
    dk, dv = (torch.zeros(1, 8, 512, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    f.fetch(tokens, wanted, None, dk, dv, 0, overlap=True)
    f.wait()
    torch.cuda.synchronize()
    got.append((dk, dv))
same = torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1]) and got[0][0].ne(0).any()
print("cases failed:", int(not same))
"""


@cuda
def test_cuda_pipelined_fetch_from_pinned_memory():
    """The copy loop pipelined (cp.async) reading pinned host memory == not pipelined. In its own
    process: should the GPU refuse such a copy from host memory, the CUDA context dies with it."""
    check_compiled(PINNED_STAGES)


@cuda
def test_cuda_copy_overlaps_compute():
    """Events on both streams: a side-stream fetch capped to 8 programs (OffloadKV's copy_programs)
    is still running when the first matmul queued behind it on the compute stream has *finished*:
    copy and compute ran at once. (The copy alone takes ~10 ms or more; one 8192^3 matmul ~2 ms.)"""
    from kernels.prefetch import RowFetcher
    M = 1 << 17
    k = torch.randn(1, 8, M, 128, device="cuda", dtype=torch.bfloat16)
    f = RowFetcher(k, k, "cuda", programs=8)
    del k
    assert f.stream.priority < torch.cuda.current_stream().priority  # the side stream goes first
    tokens = torch.arange(M, device="cuda").expand(1, 8, M).contiguous()  # 512 MiB of K+V to fetch
    dst = torch.empty(1, 8, M, 128, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    compute = torch.cuda.current_stream()
    for _ in range(2):  # the first round compiles the kernel
        torch.cuda.synchronize()
        copy_end, mm_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        f.fetch(tokens, torch.ones_like(tokens, dtype=torch.bool), tokens, dst, dst, 0, overlap=True)
        copy_end.record(f.stream)
        a = (a @ a).clamp_(-1, 1)
        mm_end.record(compute)
        for _ in range(10):
            a = (a @ a).clamp_(-1, 1)
        f.wait()
        torch.cuda.synchronize()
    assert mm_end.elapsed_time(copy_end) > 0  # the copy ended after the first matmul had ended
    torch.testing.assert_close(dst[0, :, :4], f.host_k.view(1, 8, M, 128)[0, :, :4].cuda())


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
            # (and heads), as a side-stream copy capped to a few SMs does; that loop pipelined or not
            for programs, stages in ((0, 1), (1, 1), (3, 1), (3, 3)):
                out, counts = [], []
                for fn in (gather_rows_ref, lambda *a, **kw: gather_rows_triton(*a, programs=programs, stages=stages,
                                                                               **kw)):
                    dk, dv = (torch.zeros(B, H_kv, n, D, device=DEV, dtype=dt) for _ in range(2))
                    count = torch.full((), 5, dtype=torch.int64, device=DEV)  # the rows copied are added to it
                    fn(src_k, src_v, tokens, wanted, s, dk, dv, off, ranges=ranges, count=count)
                    out.append((dk, dv))
                    counts.append(int(count))
                if counts != [5 + int(wanted.sum())] * 2:
                    bad += 1
                    print("COUNT", counts, 5 + int(wanted.sum()), programs, stages)
                # Codes are widened in float32 then rounded to dst's dtype: compiled on a GPU, min +
                # step * code may be one fused multiply-add (1 float32 ulp), and the interpreter rounds
                # float32 to bfloat16 toward zero where torch (and a GPU) round to nearest (1 ulp)
                tol = 1e-2 if dt == torch.bfloat16 else 1e-6
                same = (lambda a, b: torch.allclose(a.float(), b.float(), rtol=tol, atol=1e-6)) \
                    if codes and (DEV != "cpu" or dt == torch.bfloat16) else torch.equal
                if not (same(out[0][0], out[1][0]) and same(out[0][1], out[1][1])) or out[0][0].eq(0).all():
                    bad += 1
                    print("MISMATCH", B, H_kv, M, D, K, s is None, programs, stages, codes)
print("cases failed:", bad)
"""


def test_gather_rows_triton_matches_reference():
    check_interpreted(GATHER_CHECK)


@cuda
def test_gather_rows_compiled_matches_reference():
    check_compiled(GATHER_CHECK)
