"""OffloadKV's host store: what it holds and how it lives in pinned host memory.

The store is a pair of (B*H_kv*M, D) row tables, one for K and one for V, holding the offloaded
middle of a layer's cache (kernels/prefetch.py moves the rows a decode step selected to the device).
On a GPU the tables are pinned, and with unified virtual addressing a pinned allocation's host
address is also its device address: `cuda_view_of_pinned` hands kernels a CUDA tensor over it.

With `host="8bit"` the store holds 8-bit codes instead of the model's values: per (batch, KV head,
channel) the min m and the step s = (max - min) / 255 over the offloaded tokens, x ~ m + s * code
(asymmetric, as KIVI quantizes keys: a Llama key's outlier channels get their own step, so they do
not flatten the others). Half the bytes of bfloat16 cross the bus per row (the copy is PCIe-bound:
on the H100, 224 MiB per token at 128k) and half the pinned host memory is taken; the gather
dequantizes as it writes the device slots, in the model's dtype. The 4 (B*H_kv, D) float32 range
vectors stay on the device. Worked example: a channel spanning [-2, 6] has s = 8 / 255 = 0.0314;
x = 1.0 is code round(3 / 0.0314) = 96, read back as -2 + 96 * 0.0314 = 1.0118 (error <= s / 2).

No Triton kernel here: the store is filled once per layer, in prefill, by a few large copies; the
decode steps' reads of it are kernels/prefetch.py's gather.
"""
from __future__ import annotations

import torch

HOST = ("model", "8bit")  # what the host store holds: the model's values, or 8-bit codes


def cuda_view_of_pinned(host: torch.Tensor, device: torch.device | str = "cuda") -> torch.Tensor:
    """A CUDA tensor aliasing pinned host memory (no copy): kernels that read it pull the bytes
    over PCIe. Built through __cuda_array_interface__, which carries a raw pointer; under UVA a
    pinned allocation's host address is also its device address. The interface has no bfloat16
    type code, so the bytes travel as int16 (or int32, or uint8) and are viewed back."""
    size = host.element_size()
    raw = host.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[size])

    class _Pointer:  # the minimal object torch.as_tensor accepts as "device memory"
        __cuda_array_interface__ = {"shape": tuple(raw.shape), "typestr": "|u1" if size == 1 else f"<i{size}",
                                    "data": (raw.data_ptr(), False), "version": 3, "strides": None}

    return torch.as_tensor(_Pointer(), device=device).view(host.dtype)


STORE_BLOCK = 8192  # offloaded tokens quantized and copied to the host store at a time


def channel_ranges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H_kv, M, D) -> (step, min), each (B, H_kv, D) float32: the 8-bit store's ranges
    (module docstring)."""
    mn, mx = x.amin(dim=2).float(), x.amax(dim=2).float()  # (B, H_kv, D)
    return ((mx - mn) / 255).clamp(min=torch.finfo(torch.float32).tiny), mn  # a constant channel: any step


def channel_codes(x: torch.Tensor, step: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """x (B, H_kv, n, D), some of the tokens the ranges (B, H_kv, D) were taken over -> codes uint8."""
    return ((x.float() - mn[:, :, None]) / step[:, :, None]).round_().clamp_(0, 255).to(torch.uint8)


def quantize_channels(x: torch.Tensor, block: int = STORE_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, H_kv, M, D) -> (codes (B, H_kv, M, D) uint8, step (B*H_kv, D) float32, min (B*H_kv, D)
    float32): the 8-bit host store (module docstring). Done `block` tokens at a time, so a 128k-token
    layer never exists in float32 at once (prefill's peak)."""
    B, H_kv, M, D = x.shape
    step, mn = channel_ranges(x)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    fill_store(codes, x, (step, mn), block)
    return codes, step.reshape(B * H_kv, D), mn.reshape(B * H_kv, D)


def fill_store(dst: torch.Tensor, x: torch.Tensor, ranges: tuple[torch.Tensor, torch.Tensor] | None,
               block: int = STORE_BLOCK, non_blocking: bool = False) -> None:
    """dst (B, H_kv, M, D) <- x as it is, or its 8-bit codes of `ranges` (step, min), `block`
    tokens at a time, one copy per (batch, head): a (batch, head)'s rows are contiguous on both
    sides, so a copy to host memory goes straight there (torch stages a strided cross-device
    destination through pageable memory)."""
    B, H_kv, M, _ = x.shape
    for s in range(0, M, block):
        part = x[:, :, s:s + block]
        part = part if ranges is None else channel_codes(part, *ranges)
        for b in range(B):
            for h in range(H_kv):
                dst[b, h, s:s + block].copy_(part[b, h], non_blocking=non_blocking)


def dequantize_channels(codes: torch.Tensor, step: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """quantize_channels' inverse up to rounding: codes (B, H_kv, M, D) -> float32 min + step * code."""
    B, H_kv, _, D = codes.shape
    return codes.float() * step.view(B, H_kv, 1, D) + mn.view(B, H_kv, 1, D)


def pinned_bytes(host: int) -> int:
    """Pinned host memory a RowFetcher's `host` bytes of store take on a GPU: two equal tables (K
    and V), and torch's caching host allocator rounds each block up to a power of two
    (e.g. 100k tokens x 8 KV heads x 128 channels in 8 bits: 102 MB -> 134 MB a table, +31%)."""
    return 2 * (1 << (host // 2 - 1).bit_length()) if host else 0


def release_pinned_cache() -> None:
    """Give back to the OS the pinned host blocks torch keeps cached after their tensors died. Its
    caching host allocator serves a request only from cached blocks of the same power-of-two size,
    so the stores a hybrid's calibration freed (sized for the profile's prompt) serve no store of
    the full prompt, yet Linux counts them as used: the host check after profiling was short by
    them (~4 GiB for Llama-3.1-8B profiled at 37k tokens). torch has no public call for this
    (torch.cuda.graphs calls this private one); a build without CUDA has none and nothing to free."""
    release = getattr(torch._C, "_host_emptyCache", None)
    if release is not None and torch.cuda.is_initialized():
        release()
