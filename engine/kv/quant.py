"""QuantKV: a 1/2/4-bit KV cache with a full-precision window of recent tokens (KIVI, as TailorKV
uses it for its "dense" layers).

Keys are quantized per channel (min/max over groups of `group` tokens, because key outliers live
in fixed channels), values per token (groups of `group` along head_dim). The newest tokens stay in
full precision: keys in a residual block that is quantized all at once when it holds `residual`
tokens, values in a ring of the last `residual` tokens, each quantized as it leaves the ring.

All storage is preallocated for the run and written in place: a decode step writes one key row,
maybe one value row of codes, and at most once per `residual` steps a block of key codes. Nothing
of size O(context) is concatenated, copied or re-transposed per step (KIVI's code does that).

Token bookkeeping for `length` cached tokens:
    keys:   [0, n_kq) packed codes        [n_kq, length) in k_res[t - n_kq]   (n_kq a multiple of residual)
    values: [0, n_vq) packed codes        [n_vq, length) in v_res[t % residual] (the ring)
"""
from __future__ import annotations

import torch

from engine.kv.base import KVPolicy, tensor_bytes
from kernels.pack import quantize_pack, unpack_dequant
from kernels.quant_attn import quant_decode_attention


class QuantKV(KVPolicy):
    name = "quant"

    def __init__(self, args, layer, capacity, device, dtype, bits: int = 2, group: int = 64,
                 residual: int = 128, batch: int = 1):
        super().__init__(args, layer, capacity, device, dtype)
        D = args.head_dim
        if bits not in (1, 2, 4):
            raise ValueError(f"QuantKV bits must be 1, 2 or 4, got {bits}")
        if group <= 0 or D % group != 0:
            raise ValueError(f"QuantKV group {group} must divide head_dim {D}")
        if residual < 0:
            raise ValueError(f"QuantKV residual must be >= 0, got {residual}")
        if residual < group or residual % group != 0:
            # keys are quantized in blocks of `residual` tokens, made of whole `group`-token groups
            raise ValueError(f"QuantKV residual {residual} must be a positive multiple of group {group}")
        self.bits, self.group, self.residual = bits, group, residual
        B, H_kv, R = batch, args.n_kv_heads, residual
        # Only what can ever be quantized is allocated: keys leave the residual in whole blocks of R
        # (and one token always stays), values one by one once R newer ones exist.
        max_kq = max(0, (capacity - 1) // R * R)
        max_vq = max(0, capacity - R)
        packed = D * bits // 8
        opts = dict(device=self.device)
        self.k_codes = torch.zeros(B, H_kv, max_kq, packed, dtype=torch.uint8, **opts)
        self.k_scale = torch.zeros(B, H_kv, max_kq // group, D, dtype=dtype, **opts)
        self.k_mn = torch.zeros_like(self.k_scale)
        self.v_codes = torch.zeros(B, H_kv, max_vq, packed, dtype=torch.uint8, **opts)
        self.v_scale = torch.zeros(B, H_kv, max_vq, D // group, dtype=dtype, **opts)
        self.v_mn = torch.zeros_like(self.v_scale)
        window = min(R, capacity)
        self.k_res = torch.zeros(B, H_kv, window, D, dtype=dtype, **opts)  # (B, H_kv, R, D)
        self.v_res = torch.zeros(B, H_kv, window, D, dtype=dtype, **opts)  # ring: token t at t % R
        self.n_kq = 0
        self.n_vq = 0

    # -- writing ---------------------------------------------------------------------------------
    def _quantize_keys(self, k: torch.Tensor) -> None:
        """Append a block of keys (B, H_kv, n, D), n a multiple of group, to the packed store."""
        n = k.shape[2]
        codes, scale, mn = quantize_pack(k, self.bits, self.group, per_channel=True)
        g0 = self.n_kq // self.group
        self.k_codes[:, :, self.n_kq:self.n_kq + n] = codes
        self.k_scale[:, :, g0:g0 + n // self.group] = scale
        self.k_mn[:, :, g0:g0 + n // self.group] = mn
        self.n_kq += n

    def _quantize_values(self, v: torch.Tensor) -> None:
        """Append values (B, H_kv, n, D), oldest first, to the packed store."""
        n = v.shape[2]
        codes, scale, mn = quantize_pack(v, self.bits, self.group, per_channel=False)
        self.v_codes[:, :, self.n_vq:self.n_vq + n] = codes
        self.v_scale[:, :, self.n_vq:self.n_vq + n] = scale
        self.v_mn[:, :, self.n_vq:self.n_vq + n] = mn
        self.n_vq += n

    def prefill(self, k, v, q_window=None):
        T, R = k.shape[2], self.residual
        if T > self.capacity:
            raise RuntimeError(f"QuantKV layer {self.layer}: {T} tokens exceed capacity {self.capacity}")
        n_kq = (T - 1) // R * R if T > 0 else 0  # keep 1..R keys in full precision
        if n_kq:
            self._quantize_keys(k[:, :, :n_kq])
        self.k_res[:, :, :T - n_kq] = k[:, :, n_kq:]
        n_vq = max(0, T - R)  # keep the last R values in full precision
        if n_vq:
            self._quantize_values(v[:, :, :n_vq])
        slots = torch.arange(n_vq, T, device=self.device) % R
        self.v_res[:, :, slots] = v[:, :, n_vq:]
        self.length = T

    def attend(self, q, k_new, v_new):
        R, t = self.residual, self.length
        if t + 1 > self.capacity:
            raise RuntimeError(f"QuantKV layer {self.layer}: {t + 1} tokens exceed capacity {self.capacity}")
        if t - self.n_kq == R:  # key residual full: quantize it as one block, start a new one
            self._quantize_keys(self.k_res)
        self.k_res[:, :, t - self.n_kq] = k_new[:, :, 0]
        if t - self.n_vq == R:  # ring full: the oldest value leaves it, quantized
            slot = self.n_vq % R
            self._quantize_values(self.v_res[:, :, slot:slot + 1])
        self.v_res[:, :, t % R] = v_new[:, :, 0]  # the slot the oldest value just left
        self.length = t + 1
        return quant_decode_attention(q, self.k_codes, self.k_scale, self.k_mn, self.k_res, self.n_kq,
                                      self.v_codes, self.v_scale, self.v_mn, self.v_res, self.n_vq,
                                      self.length, self.bits, self.group)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values held, dequantized, in token order: (B, H_kv, length, D) each.
        For analysis and tests (the profiler measures quantization error with it), not decoding."""
        G = self.group
        kq = unpack_dequant(self.k_codes[:, :, :self.n_kq], self.k_scale[:, :, :self.n_kq // G],
                            self.k_mn[:, :, :self.n_kq // G], self.bits, G, per_channel=True)
        vq = unpack_dequant(self.v_codes[:, :, :self.n_vq], self.v_scale[:, :, :self.n_vq],
                            self.v_mn[:, :, :self.n_vq], self.bits, G, per_channel=False)
        ring = torch.arange(self.n_vq, self.length, device=self.device) % self.residual
        return (torch.cat([kq, self.k_res[:, :, :self.length - self.n_kq]], 2),
                torch.cat([vq, self.v_res[:, :, ring]], 2))

    def nbytes(self):
        return {"device": tensor_bytes(self.k_codes, self.k_scale, self.k_mn, self.v_codes, self.v_scale,
                                       self.v_mn, self.k_res, self.v_res), "host": 0}

    def describe(self):
        return {"policy": self.name, "bits": self.bits, "group": self.group, "residual": self.residual}
