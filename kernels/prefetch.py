"""Host -> device row fetching for OffloadKV: the offloaded K/V rows a decode step selected.

The host store is a pair of (B, H_kv, M, D) tensors, pinned when the device is a GPU so copies
can run asynchronously. A fetch gathers the wanted rows on the host into a pinned staging buffer,
then copies them to the device on a side CUDA stream; the compute stream waits on an event, so the
copy is ordered before its use without a device-wide synchronisation.
On a CPU-only machine the "device" is the CPU and the store is just a second set of tensors: the
same gather runs synchronously and returns the same rows, so results are identical.
"""
from __future__ import annotations

import torch

from engine.kv.base import tensor_bytes


class RowFetcher:
    def __init__(self, k: torch.Tensor, v: torch.Tensor, device: torch.device):
        """k, v: (B, H_kv, M, D) on any device; copied to host memory once (prefill)."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        B, H_kv, M, D = k.shape
        self.M, self.D = M, D
        # Flattened to rows so one index_select serves every (batch, head) at once.
        self.host_k = self._to_host(k.reshape(B * H_kv * M, D))
        self.host_v = self._to_host(v.reshape(B * H_kv * M, D))
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.bytes_copied = 0

    def _to_host(self, x: torch.Tensor) -> torch.Tensor:
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.cuda)
        host.copy_(x)
        return host

    def fetch(self, tokens: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, H_kv, k) middle-token ids, wanted (B, H_kv, k) bool -> the K and V rows of the
        wanted entries, (n_wanted, D) each on the device, in wanted's row-major order."""
        B, H_kv, _ = tokens.shape
        base = torch.arange(B * H_kv, device=tokens.device).view(B, H_kv, 1) * self.M
        rows = (base + tokens)[wanted]  # (n,) flat row ids into the host store
        if not self.cuda:
            k, v = self.host_k[rows], self.host_v[rows]
        else:
            rows = rows.cpu()  # the gather runs on the host; this waits for the selection
            k = torch.empty((rows.numel(), self.D), dtype=self.host_k.dtype, pin_memory=True)
            v = torch.empty_like(k, pin_memory=True)
            torch.index_select(self.host_k, 0, rows, out=k)
            torch.index_select(self.host_v, 0, rows, out=v)
            with torch.cuda.stream(self.stream):
                k = k.to(self.device, non_blocking=True)
                v = v.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            # memory allocated on the side stream is used on the compute stream: tell the allocator
            k.record_stream(compute)
            v.record_stream(compute)
        self.bytes_copied += tensor_bytes(k, v)
        return k, v

    def nbytes(self) -> int:
        return tensor_bytes(self.host_k, self.host_v)
