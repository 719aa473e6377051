"""Exact memory of a computation on the CPU: the bytes of the tensors torch ops create while a
`LiveBytes` mode is active, alive at each moment, and their peak.

Why not the allocator or the process's RSS: on the CPU neither is exact (glibc keeps freed pages,
large blocks come and go with mmap), and on a GPU the caching allocator rounds every block. This
counts each new storage once, by its own size, when an op returns it, and subtracts it when its
storage is freed (a weakref finalizer). A result in the storage of one of the op's inputs (a view
such as `t()` or a slice, an in-place op) allocates nothing and is not counted, so tensors made
before the mode (weights, a cache allocated earlier) never count, even through a view made under it.
(The op's schema cannot tell: an `out=` variant aliases its output argument, yet may allocate it.)
Tests use it to hold the prefill's peak to ModelArgs.prefill_bytes (tests/test_prefill_chunks.py),
and tools/prefill_memory.py to measure it at Llama-3.1-8B's shapes.

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
        # the inputs' storages before the op: an `out=` argument it resizes gets a new one, counted
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:  # new (a view shares its base's)
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out
