"""Exact memory of a computation on the CPU: the bytes of the tensors torch ops create while a
`LiveBytes` mode is active, alive at each moment, and their peak.

Why not the allocator or the process's RSS: on the CPU neither is exact (glibc keeps freed pages,
large blocks come and go with mmap), and on a GPU the caching allocator rounds every block. This
counts each new storage once, by its own size, when an op returns it, and subtracts it when its
storage is freed (a weakref finalizer), so a view costs nothing and an in-place op nothing more.
Tests use it to hold the prefill's peak to ModelArgs.prefill_bytes (tests/test_prefill_chunks.py),
and tools/prefill_memory.py to measure it at Llama-3.1-8B's shapes. Tensors made before the mode
(weights, a cache allocated earlier) count only when an op under it returns a view of one: then the
viewed storage is counted whole (a tied model's embedding lookup through head.t() counts the head:
0.6 MiB too many for SmolLM2-135M's prefill).

    with LiveBytes() as lb:
        a = torch.ones(1000)   # now 4000, peak 4000
        b = a * 2              # now 8000, peak 8000
        del a, b
    lb.peak, lb.now            # (8000, 0)
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # storage address -> bytes, for the storages alive now
        self.now, self.peak = 0, 0

    def _free(self, key: int) -> None:
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
