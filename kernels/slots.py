"""OffloadKV's slot assignment: which device slots keep their chunk and which receive a newly
selected one, as the list of rows to fetch.

The device buffer has k slots per (batch, KV head); slot i holds chunk slots[i] (chunk c covers
`chunk` consecutive rows of the host store). A step selects k chunks, `new` (sorted ids). A slot
whose chunk is still selected keeps it: no bytes move. The other slots are free and take the
newly selected chunks that no slot holds yet, the j-th free slot (in slot order) the j-th such
chunk (in id order); there are as many of each. Worked example, k = 4:

    slots = [7, 2, 9, 4]   new = [2, 4, 5, 8]
    keep  = [F, T, F, T]   slots 1 and 3 keep chunks 2 and 4
    absent chunks of new, in order: [5, 8]   free slots: [0, 2]
    -> slots = [5, 2, 8, 4], rows to fetch: those of chunks 5 and 8, into slots 0 and 2.

Output, in slot order: for slot i, rows[i*chunk + r] = slots[i]*chunk + r (the host row its r-th
row comes from) and wanted[i*chunk + r] = whether slot i's chunk is new (every slot when reuse is
off: the baseline that refetches all, with the same assignment, so reuse never changes a result).
The fetch (kernels/prefetch.py) copies the wanted rows into device row i*chunk + r.

On a GPU this is one small kernel per layer and step (one program per (batch, KV head): binary
searches of the slots in `new`, a prefix sum to rank free slots and absent chunks, and two scatters
through a scratch row) in place of some twenty torch ops (a searchsorted, gathers, scatters, prefix
sums), each a launch inside the decode step's CUDA graph. The torch version is the reference; it
takes the same steps, over the whole batch at once (until 2026-11-30 it sorted instead: one more
searchsorted, a sort and a stable argsort, 1.5x the time on a CPU: 226 against 147 us for 3
heads of 739 slots).

One program holds a head's whole row of k slots, BLOCK = next power of two >= k, spread over
BLOCK / 512 warps (16 values per thread). Compiled for sm_90 (ptxas), that stays at 128-210
registers and no spills up to BLOCK 8192 (16 warps; 164 bytes a thread when k is a multiple of 16,
which the launch specializes on); at 4 warps BLOCK 8192 spilled 5 KB and BLOCK
16384 spilled 55 KB and took 194 s to compile (triton 3.9, 2 cores), and at 32 warps (the most a
program has) BLOCK 16384 still spills. So past MAX_K slots (a 128k hybrid's offload layer with a
budget of 10-20% of the prompt, chunk 1) the torch reference runs instead: its ops are all
graph-safe (no host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import use_triton


def _expand(chunks: torch.Tensor, wanted: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, k) chunk ids and flags -> (B, H, k * chunk) host rows and flags, slot order kept."""
    if chunk == 1:
        return chunks, wanted
    step = torch.arange(chunk, device=chunks.device)
    return (chunks[..., None] * chunk + step).flatten(-2), wanted[..., None].expand(-1, -1, -1, chunk).flatten(-2)


def assign_slots_ref(slots: torch.Tensor, new: torch.Tensor, chunk: int, reuse: bool = True):
    """slots (B, H, k) int64, updated in place; new (B, H, k) int64, sorted ascending per head
    -> (rows, wanted), each (B, H, k * chunk): the module docstring's assignment, in the kernel's
    steps (no sort: every op is graph-safe, and cheap on a CPU, where this is the path)."""
    B, H, k = new.shape
    at = torch.searchsorted(new, slots).clamp_(max=k - 1)  # where slot i's chunk is, or would be, in new
    keep = new.gather(-1, at) == slots  # (B, H, k): slot i's chunk is still selected
    held = torch.zeros(B, H, k + 1, dtype=torch.bool, device=new.device)  # new[j] is in a kept slot
    held.scatter_(-1, torch.where(keep, at, k), True)  # (column k takes the free slots' marks)
    # Every head has as many free slots as absent chunks, so in the flattened order (head after
    # head) the j-th free slot and the j-th absent chunk are in the same head: one prefix sum over
    # the whole batch ranks each. E.g. two heads of 3, absent [F T T | T F F], free [T F T | F F T]:
    # the absent chunks new[0, 1], new[0, 2], new[1, 0] (ranks 0, 1, 2) go to the free slots of
    # the same ranks, slots[0, 0], slots[0, 2], slots[1, 2].
    absent, free = ~held[..., :k].flatten(), (~keep).flatten()
    ranked = absent.cumsum(0)
    i = torch.arange(absent.numel(), device=new.device)
    # a permutation of new: the absent chunks first, in order, then the others (no index repeats)
    to = torch.where(absent, ranked - 1, absent.sum() + i - ranked)
    order = torch.empty_like(to).scatter_(0, to, new.flatten())
    took = order.gather(0, (free.cumsum(0) - 1).clamp_(min=0)).view(B, H, k)  # free slot's chunk
    slots.copy_(torch.where(keep, slots, took))
    return _expand(slots, ~keep if reuse else torch.ones_like(keep), chunk)


@triton.jit
def _assign_kernel(slots_ptr, new_ptr, scratch_ptr, rows_ptr, want_ptr, K,
                   CHUNK: tl.constexpr, CHUNK_P2: tl.constexpr, REUSE: tl.constexpr,
                   N_ITER: tl.constexpr, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * K  # one (batch, KV head): k slots
    i = tl.arange(0, BLOCK)
    live = i < K
    slot = tl.load(slots_ptr + base + i, mask=live, other=0)
    # keep: is slot i's chunk in the sorted `new`? lo = the first j with new[j] >= slot (binary search)
    lo = tl.zeros((BLOCK,), tl.int32)
    hi = tl.zeros((BLOCK,), tl.int32) + K
    for _ in tl.static_range(N_ITER):  # N_ITER = bit length of K: enough halvings of [0, K)
        active = lo < hi
        mid = (lo + hi) // 2
        less = tl.load(new_ptr + base + mid, mask=live & active, other=0) < slot
        lo = tl.where(active & less, mid + 1, lo)
        hi = tl.where(active & ~less, mid, hi)
    found = live & (lo < K)
    keep = found & (tl.load(new_ptr + base + lo, mask=found, other=-1) == slot)
    # present: new[j] is held by a kept slot; marked through the scratch row (zeroed, then flagged)
    tl.store(scratch_ptr + base + i, tl.zeros((BLOCK,), tl.int64), mask=live)
    tl.debug_barrier()
    tl.store(scratch_ptr + base + lo, tl.zeros((BLOCK,), tl.int64) + 1, mask=keep)
    tl.debug_barrier()
    present = tl.load(scratch_ptr + base + i, mask=live, other=1) != 0
    # the absent chunks, compacted in order into the scratch row; free slot i takes the rank(i)-th
    fresh = live & ~present
    tl.debug_barrier()  # every present flag is read before the row is overwritten
    chunk_id = tl.load(new_ptr + base + i, mask=fresh, other=0)
    tl.store(scratch_ptr + base + tl.cumsum(fresh.to(tl.int32), axis=0) - 1, chunk_id, mask=fresh)
    tl.debug_barrier()
    free = live & ~keep
    took = tl.load(scratch_ptr + base + tl.cumsum(free.to(tl.int32), axis=0) - 1, mask=free, other=0)
    slot = tl.where(keep, slot, took)
    tl.store(slots_ptr + base + i, slot, mask=live)
    if REUSE:
        want = free
    else:
        want = live
    r = tl.arange(0, CHUNK_P2)
    at = (base + i[:, None]) * CHUNK + r[None, :]  # (BLOCK, CHUNK_P2) output rows, slot order
    m = live[:, None] & (r[None, :] < CHUNK)
    tl.store(rows_ptr + at, slot[:, None] * CHUNK + r[None, :], mask=m)
    tl.store(want_ptr + at, (want[:, None] & (r[None, :] < CHUNK)).to(tl.int8), mask=m)


MAX_K = 8192  # the most slots per head the kernel takes (module docstring)


def assign_slots_triton(slots: torch.Tensor, new: torch.Tensor, chunk: int, reuse: bool = True):
    """Same contract as assign_slots_ref (slots must be contiguous: updated in place)."""
    B, H, k = new.shape
    if k > MAX_K:
        raise ValueError(f"assign_slots_triton takes at most {MAX_K} slots per head, got {k}")
    if not slots.is_contiguous() or slots.dtype != torch.int64 or new.dtype != torch.int64:
        raise ValueError("assign_slots: slots and new must be int64, slots contiguous")
    new = new.contiguous()
    scratch = torch.empty_like(new)
    rows = torch.empty(B, H, k * chunk, dtype=torch.int64, device=new.device)
    wanted = torch.empty(B, H, k * chunk, dtype=torch.bool, device=new.device)
    block = triton.next_power_of_2(k)
    if B * H and k:
        _assign_kernel[(B * H,)](slots, new, scratch, rows, wanted.view(torch.int8), k, CHUNK=chunk,
                                 CHUNK_P2=triton.next_power_of_2(chunk), REUSE=reuse, N_ITER=k.bit_length(),
                                 BLOCK=block, num_warps=max(4, block // 512))
    return rows, wanted


def assign_slots(slots: torch.Tensor, new: torch.Tensor, chunk: int, reuse: bool = True):
    fn = assign_slots_triton if use_triton(new) and new.shape[-1] <= MAX_K else assign_slots_ref
    return fn(slots, new, chunk, reuse)
