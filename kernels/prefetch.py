"""Host -> device row fetching for OffloadKV: the offloaded K/V rows a decode step selected.

The host store (kernels/host_store.py) is a pair of (B*H_kv*M, D) row tables, pinned when the
device is a GPU. With unified virtual addressing a GPU kernel can read pinned host memory directly
over PCIe, so a fetch is one *zero-copy gather* kernel: it reads exactly the wanted rows from host
memory and writes them into their device slots. No host-side gather, no staging buffer, and no
device->host sync to learn which rows were selected (the row ids never leave the GPU). Measured on
an H100 (PCIe 5): 16,000 random 256-byte rows in 87 us (47 GB/s) vs 264 us for gather-on-host +
staged copy.

The copy can run on a side CUDA stream (`fetch(..., overlap=True)`, or any work inside `side()`):
it waits only for the work already queued (e.g. the query it selects with), and the compute stream
waits on an event just before it reads the rows (`wait()`), so work issued early overlaps whatever
compute is queued in between. The side stream comes from torch's high-priority pool: its kernels are
few and small (scores, top-k, slot assignment, a capped copy) and a later layer waits on them, so
when blocks of both streams wait for an SM, its go first. That also keeps it apart from the
default-priority streams that CUDA-graph capture and warm-up use: torch hands out 32 streams per
priority in turn, and with 32 offloaded layers one fetcher would otherwise share the capture
stream, and its work would overlap nothing.
On CPU the same call gathers synchronously with plain torch indexing: identical results.

With `host="8bit"` the store holds 8-bit codes (kernels/host_store.py: per channel a min and a
step), and the gather dequantizes them as it writes the device slots, in the model's dtype.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kernels import use_triton
from kernels.host_store import HOST, STORE_BLOCK, channel_ranges, cuda_view_of_pinned, fill_store


def gather_rows_ref(src_k, src_v, tokens, wanted, slots, dst_k, dst_v, offset: int, ranges=None,
                    count: torch.Tensor | None = None) -> None:
    """Reference. src_* (B*H_kv*M, D) row tables; tokens (B, H_kv, k) int64; wanted (B, H_kv, k)
    bool; slots (B, H_kv, k) int64, or None for slots[b, h, j] = j; dst_* (B, H_kv, n, D). For every
    wanted (b, h, j): dst[b, h, offset + slots[b,h,j]] = src[(b*H_kv + h)*M + tokens[b,h,j]].
    ranges: None (src holds values), or (k_step, k_min, v_step, v_min), each (B*H_kv, D) float32:
    src holds 8-bit codes, written as min + step * code (float32, then the dst dtype). count: a
    () int64 device tensor the number of rows copied is added to (statistics, without a sync)."""
    if count is not None:
        count += wanted.sum()
    B, H_kv, _ = tokens.shape
    M = src_k.shape[0] // (B * H_kv)
    b, h, j = wanted.nonzero(as_tuple=True)
    bh = b * H_kv + h
    rows = bh * M + tokens[b, h, j]
    pos = offset + (j if slots is None else slots[b, h, j])
    # (index_select, not src[rows]: the same rows, 1.7x faster on a CPU, where this is the path)
    for src, dst, r in ((src_k, dst_k, ranges and ranges[:2]), (src_v, dst_v, ranges and ranges[2:])):
        got = src.index_select(0, rows).to(dst.device)  # (n, D)
        if r:
            step, mn = (t.index_select(0, bh) for t in r)  # (n, D) each
            got = got.float().mul_(step).add_(mn)
        dst[b, h, pos] = got.to(dst.dtype)


@triton.jit
def _gather_rows_kernel(src_k, src_v, tok_ptr, want_ptr, slot_ptr, dst_k, dst_v, ks_ptr, km_ptr, vs_ptr, vm_ptr,
                        count_ptr, K, M, N_DST, offset, N_BLK, N_ITEMS,
                        D: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr, CODES: tl.constexpr,
                        COUNT: tl.constexpr, STAGES: tl.constexpr):
    # Work item i = one (batch, KV head) bh x its block blk of BLOCK entries, bh = i // N_BLK.
    # Program p takes items p, p + P, p + 2P, ... (P programs): with one program per item it runs
    # once; with a few programs (`programs=`) each walks many items and the rest of the GPU is free.
    # num_stages: Triton pipelines a loop's loads only where a dot consumes them, unless told; told,
    # a program keeps the rows of STAGES - 1 items in flight (cp.async into shared memory), not one.
    copied = tl.zeros((), tl.int64)  # rows this program copies, for the statistics (COUNT)
    for i in tl.range(tl.program_id(0), N_ITEMS, tl.num_programs(0), num_stages=STAGES):
        bh, blk = i // N_BLK, i % N_BLK
        j = blk * BLOCK + tl.arange(0, BLOCK)
        want = tl.load(want_ptr + bh * K + j, mask=j < K, other=0) != 0
        tok = tl.load(tok_ptr + bh * K + j, mask=want, other=0)
        if SLOTS:
            slot = tl.load(slot_ptr + bh * K + j, mask=want, other=0)
        else:  # entry j goes to slot j
            slot = j
        d = tl.arange(0, D)
        src = (bh * M + tok).to(tl.int64)[:, None] * D + d[None, :]
        dst = (bh * N_DST + offset + slot).to(tl.int64)[:, None] * D + d[None, :]
        m = want[:, None]  # masked lanes issue no load: only wanted rows cross the bus
        k = tl.load(src_k + src, mask=m)
        v = tl.load(src_v + src, mask=m)
        if CODES:  # 8-bit codes: min + step * code per channel of this (batch, KV head)
            r = bh * D + d
            k = tl.load(km_ptr + r)[None, :] + tl.load(ks_ptr + r)[None, :] * k.to(tl.float32)
            v = tl.load(vm_ptr + r)[None, :] + tl.load(vs_ptr + r)[None, :] * v.to(tl.float32)
        tl.store(dst_k + dst, k.to(dst_k.dtype.element_ty), mask=m)
        tl.store(dst_v + dst, v.to(dst_v.dtype.element_ty), mask=m)
        copied += tl.sum(want.to(tl.int64))
    if COUNT:  # one atomic add per program: a torch sum and add would be two more graph nodes
        tl.atomic_add(count_ptr, copied)


def gather_rows_triton(src_k, src_v, tokens, wanted, slots, dst_k, dst_v, offset: int, programs: int = 0,
                       ranges=None, stages: int = 1, count: torch.Tensor | None = None) -> None:
    """programs: how many programs (each on one SM) walk the blocks of 32 entries; 0 = one per
    block, as many as the GPU will run at once. Why cap it: a fetch on the side stream is meant to
    hide behind the weight-bound kernels of the compute stream, but a program reading host memory
    mostly waits on PCIe latency while it holds its SM; spread over every SM it delays the very
    kernels it should hide behind. A few programs, each keeping a block's 32 K and V rows (16 KiB at
    head_dim 128, bfloat16) in flight, may still fill PCIe: 8 programs x 16 KiB per ~1.5 us round
    trip ~ 90 GB/s, and more with the loop pipelined (`stages` > 1; compiled for sm_90 with 3, each
    program's loop issues 11-23 asynchronous copies, cp.async, which have yet to run from pinned
    host memory: so 1 until tools/kernel_timing.py has timed both). Whether they do, and what
    overlap that buys, is for tools/offload_gpu.py and tools/kernel_timing.py."""
    B, H_kv, K = tokens.shape
    D = src_k.shape[1]
    if D & (D - 1) or not dst_k.is_contiguous() or not dst_v.is_contiguous():
        raise ValueError("the Triton gather needs a power-of-two head_dim and contiguous buffers")
    if programs < 0:
        raise ValueError(f"programs must be >= 0, got {programs}")
    BLOCK = 32
    n_blk = triton.cdiv(K, BLOCK)
    n_items = B * H_kv * n_blk
    grid = (min(programs, n_items) if programs else n_items,)
    tokens = tokens.contiguous()
    slot_arg = tokens if slots is None else slots.contiguous()  # without slots the kernel never reads it
    ks, km, vs, vm = (t.contiguous() for t in ranges) if ranges else (dst_k,) * 4  # unread without codes
    _gather_rows_kernel[grid](src_k, src_v, tokens, wanted.contiguous(), slot_arg, dst_k, dst_v, ks, km, vs, vm,
                              tokens if count is None else count, K, src_k.shape[0] // (B * H_kv), dst_k.shape[2],
                              offset, n_blk, n_items, D=D, BLOCK=BLOCK, SLOTS=slots is not None,
                              CODES=ranges is not None, COUNT=count is not None, STAGES=stages)


def gather_rows(src_k, src_v, tokens, wanted, slots, dst_k, dst_v, offset: int, programs: int = 0,
                ranges=None, stages: int = 1, count: torch.Tensor | None = None) -> None:
    D = src_k.shape[1]
    if use_triton(dst_k) and not D & (D - 1) and dst_k.is_contiguous() and dst_v.is_contiguous():
        gather_rows_triton(src_k, src_v, tokens, wanted, slots, dst_k, dst_v, offset, programs, ranges, stages, count)
    else:
        gather_rows_ref(src_k, src_v, tokens, wanted, slots, dst_k, dst_v, offset, ranges, count)


class RowFetcher:
    def __init__(self, k: torch.Tensor, v: torch.Tensor, device: torch.device, programs: int = 0,
                 host: str = "model", stages: int = 1):
        """k, v: (B, H_kv, M, D) on any device; copied to host memory once (prefill). programs: the
        overlapped (side-stream) copies' program cap (gather_rows_triton); 0 = none. A copy on the
        critical path always takes the whole GPU. host: "model" (k and v as they are) or "8bit"
        (codes; the ranges stay on the device). stages: the copy loop's pipeline depth (1 = none)."""
        if host not in HOST:
            raise ValueError(f"host store must be one of {', '.join(HOST)}, got {host!r}")
        self.device = torch.device(device)
        self.programs, self.stages = programs, stages
        self.cuda = self.device.type == "cuda"
        B, H_kv, M, D = k.shape
        self.ranges = None  # (k_step, k_min, v_step, v_min) with 8-bit codes, each (B*H_kv, D)
        k_ranges = v_ranges = None
        if host == "8bit":
            k_ranges, v_ranges = channel_ranges(k), channel_ranges(v)
            self.ranges = tuple(t.reshape(B * H_kv, D).to(self.device) for t in (*k_ranges, *v_ranges))
        self.host_k, self.host_v = self._to_host(k, k_ranges), self._to_host(v, v_ranges)  # (B*H_kv*M, D) each
        # What kernels read: the pinned store itself, seen from the GPU.
        self.src_k = cuda_view_of_pinned(self.host_k, self.device) if self.cuda else self.host_k
        self.src_v = cuda_view_of_pinned(self.host_v, self.device) if self.cuda else self.host_v
        self.stream = torch.cuda.Stream(self.device, priority=-1) if self.cuda else None  # high priority
        self.ready: torch.cuda.Event | None = None  # set while an overlapped fetch is in flight
        self.row_bytes = 2 * D * self.host_k.element_size()  # one K row + one V row, as stored (what crosses the bus)
        self.rows_copied = torch.zeros((), dtype=torch.int64, device=self.device)  # no sync to count

    def _to_host(self, x: torch.Tensor, ranges: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x (B, H_kv, M, D) (a view of the layer's K or V) -> the host store's rows (B*H_kv*M, D),
        flattened so one index serves every (batch, head) at once: as they are, or as 8-bit codes
        of `ranges`. Filled STORE_BLOCK tokens at a time, so neither a contiguous copy of the
        middle nor its codes ever exist whole on the device (at 128k, 8 KV heads of 128: 256 MiB in
        bfloat16, 128 MiB of codes, beside the prefill's other buffers)."""
        B, H_kv, M, D = x.shape
        host = torch.empty(x.shape, dtype=x.dtype if ranges is None else torch.uint8, pin_memory=self.cuda)
        fill_store(host, x, ranges, STORE_BLOCK, non_blocking=self.cuda)
        if self.cuda:  # the copies were queued without waiting (the sources' memory is reused in
            torch.cuda.current_stream(self.device).synchronize()  # stream order); the store is read later
        return host.view(B * H_kv * M, D)

    def fetch(self, tokens, wanted, slots, dst_k, dst_v, offset: int, overlap: bool = False) -> None:
        """Copy the wanted rows (see gather_rows_ref; slots None: entry j into slot j) into dst_k/dst_v.
        With overlap (CUDA only) the copy runs on the side stream and `wait()` must be called before
        dst is read."""
        if not (overlap and self.cuda):
            self.copy(tokens, wanted, slots, dst_k, dst_v, offset)
            return
        with self.side(tokens, wanted, slots):
            self.copy(tokens, wanted, slots, dst_k, dst_v, offset, self.programs)

    def copy(self, tokens, wanted, slots, dst_k, dst_v, offset: int, programs: int = 0) -> None:
        """fetch's copy on the current stream, on at most `programs` programs (0: no cap)."""
        gather_rows(self.src_k, self.src_v, tokens, wanted, slots, dst_k, dst_v, offset, programs, self.ranges,
                    self.stages, self.rows_copied)

    @contextlib.contextmanager
    def side(self, *inputs: torch.Tensor | None):
        """CUDA only: the work queued inside runs on the side stream, after everything queued on the
        compute stream so far; `wait()` orders the compute stream after it. inputs: tensors made on
        the compute stream that the work reads (their memory must not be reused before it ran)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield
        for t in inputs:
            if t is not None:
                t.record_stream(self.stream)
        self.ready = torch.cuda.Event()
        self.ready.record(self.stream)

    def wait(self) -> None:
        """Order the compute stream after an overlapped fetch (a no-op when none is in flight)."""
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None

    @property
    def bytes_copied(self) -> int:
        return int(self.rows_copied.item()) * self.row_bytes

    def nbytes(self) -> dict[str, int]:
        """{"device": the 8-bit ranges (0 without), "host": the store}."""
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return {"device": size(self.ranges or ()), "host": size((self.host_k, self.host_v))}
