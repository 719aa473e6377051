"""QuantKV: a 1/2/4-bit KV cache with a full-precision window of recent tokens (KIVI, as TailorKV
uses it for its "dense" layers).

Keys are quantized per channel (min/max over groups of `group` tokens, because key outliers live
in fixed channels), values per token (groups of `group` along head_dim). The newest tokens stay in
full precision: keys in a residual block that is quantized all at once when it holds `residual`
tokens, values in a ring of the last `residual` tokens, each quantized as it leaves the ring.

Rotation (`rotate`, QuaRot/RotateKV): a group's min/max is set by its largest element, so one outlier
channel costs every other channel of a value row its resolution. Multiplying each head's vectors
by an orthonormal Hadamard matrix R (D x D, entries +-1/sqrt(D)) spreads every channel over all of
them before quantizing. Nothing else changes: q.k = (qR).(kR) since R R^T = I, so the step rotates
its query and attends over the rotated keys; the attention output over rotated values is out R,
rotated back by R^T. Worked example, D = 2: R = [[1, 1], [1, -1]] / sqrt(2) turns the value
(4, 0) into (2.83, 2.83): an outlier channel becomes two ordinary ones. "v" rotates values only
(keys are quantized per channel, where an outlier channel already has its own scale); "kv" both;
"auto" (the default) is "kv" when head_dim is a power of two (every Llama: 64 or 128), else "none".
Measured on the default model (tools/quant_ablation.py, 2k tokens): relative attention-output error
at 2 bits 0.476 -> 0.346 with "kv" -> 0.183 with "kv" and one sink -> 0.163 at group 32; at 4 bits
0.080 -> 0.029 with "kv" and one sink. Keys quantized per token after the rotation, or before
RoPE (KVQuant), measured worse or no better, so neither is built.

Held tokens: a few tokens per KV head stay in full precision beside the store, because an error on
a token that draws much of the attention moves every output. `sink` = n holds tokens [0, n)
(StreamingLLM's attention sinks: in Llama models token 0, the BOS, draws most of many heads'
attention, and its outlier key would stretch the min/max of its whole key group). `heavy` = f
holds f x prompt more per KV head: the ones the prompt's last 32 queries attend to most (SnapKV's
window scores, summed over the group's query heads), i.e. the heavy hitters the answer will read,
such as the question and what it asks about. Their rows cost 2 D elements each; a bit mask over the
positions tells the kernels which store entries get no weight (kernels/quant_attn.py), and before packing
a held key is replaced by the mean of its group's other keys, so it widens no range. Measured on
the default model (relative attention-output error, rotate kv + clip v; pass-key prompts of 2k
tokens with 8 answer queries / 4k tokens of GPL-3 with 64 teacher-forced queries): at 2 bits 0.147 /
0.128 with the sink only -> 0.101 / 0.097 holding 1% of the prompt -> 0.095 / 0.086 holding 2%; at
1 bit 0.295 / 0.210 -> 0.145 / 0.100 (2%); at 4 bits 0.029 / 0.014 -> 0.015 / 0.010 (1%). Held by
largest key instead of by attention: 0.144 / 0.123 at 2%. End to end (bench.py, 4k, KL over 256
tokens of GPL-3): 1% costs 5% more bytes at 4 bits for KL 0.0040 -> 0.0024, 8% more at 2 bits for
0.127 -> 0.112, so it is the default (`heavy=0.01`). Without the prompt's queries (direct calls)
only the sinks are held.

Clipping (`clip`, kernels/ranges.py): each group's range is the candidate between its min/max and a
quarter of it that minimizes the squared error, instead of min/max itself. Measured on the default
model (tools/quant_ablation.py, 2k tokens, rotate kv + one sink): clipped values cut the relative
attention-output error at 2 bits from 0.183 to 0.147; clipped keys raise it to 0.206 (layers 3-10
go from ~0.2 to ~0.6: a key's extremes decide which tokens win the softmax, and clipping them moves
the winners), but at 1 bit min/max keys are useless (two levels at the extremes: error 1.46 with
clipped values) and clipped keys bring the whole cache from 3.89 to 0.295. So "auto" (the default)
clips values at 2 and 4 bits, keys and values at 1 bit.

Ranges (`scales`): each group's scale and min are stored as two 8-bit e4m3 bytes of a per-head
superscale ("fp8", kernels/fp8.py) or in the model's dtype ("model"); "auto" (the default) is
"fp8" at 1 and 2 bits, "model" at 4. 8-bit ranges make group 32 (the default with them) cost what
group 64 costs with bfloat16 ranges, and each group's byte pair is the best of the 9 around its
float range by squared error, which acts as a small clip search of its own. Measured end to end on the default model (bench.py, 4k, KL over 256
tokens of GPL-3, 20 pass keys; float32, so float ranges cost 4 bytes here): 2 bits, group 64,
KL 0.112 -> 0.070 with 8-bit ranges at fewer bytes; group 32 0.059 -> 0.051 (20/20), at the bytes
of group 64 with bfloat16 ranges. At 4 bits they save 0.25 of 4.5 bits per value, a range off by
1/16 moves the top level by a whole step, and on the suite's UUID prompt 8-bit ranges (group 32 or
64) change one character where float ranges keep it (KL 0.0019 at group 32, 8-bit, vs 0.0024):
so 4 bits keeps float ranges and group 64.

All storage is preallocated for the run and written in place: a decode step writes one key row,
one value row of codes, and once per `residual` steps a block of key codes. Nothing of size
O(context) is concatenated, copied or re-transposed per step (KIVI's code does that).

Token bookkeeping for `length` cached tokens, R = residual:
    keys:   [0, n_kq) packed codes        [n_kq, length) in k_res[t - n_kq]   (n_kq a multiple of R)
    values: [0, n_vq) packed codes        [n_vq, length) in v_res[t % R]      (the ring)
Both follow from the newest position p alone (n_kq = p - p % R, n_vq = max(0, p + 1 - R)), which
is what lets the decode step run from a CUDA graph: the step writes row p % R of both windows and
the value that row held (token p - R) is packed first, all on the device; only the key block flush,
once every R steps, is decided on the host, in before_step().
"""
from __future__ import annotations

import math

import torch

from engine.kv.base import KVPolicy, tensor_bytes
from engine.kv.evict import window_scores
from kernels.fp8 import quantize_pack_fp8, superscale, unpack_dequant_fp8
from kernels.pack import quantize_pack, unpack_dequant
from kernels.quant_append import quant_append
from kernels.quant_attn import pack_mask, quant_decode_attention, unpack_mask


def hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester-Hadamard matrix scaled to be orthonormal (n a power of two), float32."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


ROTATE = ("auto", "none", "v", "kv")
CLIP = ("auto", "none", "v", "kv")
SCALES = ("auto", "model", "fp8")
HEAVY_WINDOW = 32  # prompt queries whose attention picks the heavy hitters


class QuantKV(KVPolicy):
    name = "quant"
    # prompt tokens rotated and packed at a time (prefill): the CPU quantizers hold ~9 float32 copies
    # of a block, kept below a prefill chunk's activations even in bfloat16 (tests/test_prefill_chunks.py)
    prefill_block = 4096

    def __init__(self, args, layer, capacity, device, dtype, bits: int = 2, group: int | None = None,
                 residual: int = 128, rotate: str = "auto", sink: int = 1, clip: str = "auto",
                 heavy: float = 0.01, scales: str = "auto"):
        super().__init__(args, layer, capacity, device, dtype)
        if scales not in SCALES:
            raise ValueError(f"QuantKV scales must be one of {', '.join(SCALES)}, got {scales!r}")
        self.scales = scales = self._ranges(scales, bits)
        self.bits, self.group, self.residual = self._check(args.head_dim, bits, group, residual, scales)
        D = args.head_dim
        self.rotate = self._rotation(rotate, D)
        if clip not in CLIP:
            raise ValueError(f"QuantKV clip must be one of {', '.join(CLIP)}, got {clip!r}")
        self.clip = ("kv" if bits == 1 else "v") if clip == "auto" else clip
        if not isinstance(sink, int) or sink < 0:
            raise ValueError(f"QuantKV sink must be a whole number >= 0, got {sink!r}")
        if not isinstance(heavy, (int, float)) or not 0 <= heavy < 1:
            raise ValueError(f"QuantKV heavy must be a fraction of the prompt in [0, 1), got {heavy!r}")
        self.sink, self.heavy = sink, heavy
        self.k_sup = self.v_sup = None  # (B, H_kv) float32 superscales of 8-bit ranges, set at prefill
        self.q_window = HEAVY_WINDOW if heavy else 0  # the prompt queries that pick the heavy hitters
        self.k_held = self.v_held = None  # (B, H_kv, S, D) full precision, S = n_held(prompt), at prefill
        self.held_mask = None  # (B, H_kv, ceil(capacity / 8)) uint8: bit t set = token t is held
        self.rot = None  # (D, D) the rotation, made at prefill with the rest
        self.k_codes = self.k_scale = self.k_mn = None  # allocated at prefill (B from the prompt)
        self.v_codes = self.v_scale = self.v_mn = self.k_res = self.v_res = None
        self.n_kq = 0  # keys packed so far (host counter: the flush is scheduled on the host)

    @staticmethod
    def _check(D: int, bits: int, group: int | None, residual: int, scales: str) -> tuple[int, int, int]:
        """Validated (bits, group, residual); group defaults to 32 with 8-bit ranges and 64 with the
        model's (the same bytes in bfloat16), or the largest divisor of head_dim below it (a value
        group is a slice of one head)."""
        group = math.gcd(32 if scales == "fp8" else 64, D) if group is None else group
        if bits not in (1, 2, 4):
            raise ValueError(f"QuantKV bits must be 1, 2 or 4, got {bits}")
        if group <= 0 or D % group != 0:
            raise ValueError(f"QuantKV group {group} must divide head_dim {D}")
        if residual < group or residual % group != 0:
            # keys are quantized in blocks of `residual` tokens, made of whole `group`-token groups
            raise ValueError(f"QuantKV residual {residual} must be a positive multiple of group {group}")
        return bits, group, residual

    @staticmethod
    def _ranges(scales: str, bits: int) -> str:
        """"auto" resolved: 8-bit ranges at 1 and 2 bits, the model's dtype at 4 (module docstring)."""
        return ("fp8" if bits <= 2 else "model") if scales == "auto" else scales

    @staticmethod
    def _rotation(rotate: str, D: int) -> str:
        """The rotation used: `rotate` validated, "auto" resolved for this head_dim."""
        if rotate not in ROTATE:
            raise ValueError(f"QuantKV rotate must be one of {', '.join(ROTATE)}, got {rotate!r}")
        power_of_two = D & (D - 1) == 0
        if rotate == "auto":
            return "kv" if power_of_two else "none"
        if rotate != "none" and not power_of_two:
            raise ValueError(f"QuantKV rotate needs a power-of-two head_dim, got {D}")
        return rotate

    @staticmethod
    def n_held(prompt: int, sink: int, heavy: float) -> int:
        """Tokens held in full precision per KV head for a `prompt`-token prompt."""
        return min(prompt, sink + int(heavy * prompt))

    def _pick_held(self, k: torch.Tensor, q_window: torch.Tensor | None) -> torch.Tensor:
        """k (B, H_kv, T, D) -> positions (B, H_kv, S) ascending: the sinks, then the heavy hitters."""
        B, H_kv, T, _ = k.shape
        S = self.n_held(T, self.sink, self.heavy) if q_window is not None else min(T, self.sink)
        if S == min(T, self.sink):
            return torch.arange(S, device=k.device).expand(B, H_kv, S)
        score = window_scores(k, q_window, pool=1)  # (B, H_kv, T)
        score[..., :self.sink] = float("inf")  # the sinks first, whatever their score
        return score.topk(S, dim=-1).indices.sort(dim=-1).values

    @staticmethod
    def _rows(capacity: int, R: int) -> tuple[int, int, int]:
        """(packed key rows, packed value rows, window rows): only what can ever be quantized is
        allocated; keys leave the residual in whole blocks of R (one token always stays), values one
        by one once R newer ones exist."""
        return max(0, (capacity - 1) // R * R), max(0, capacity - R), min(R, capacity)

    def prefill(self, k, v, q_window=None):
        B, H_kv, T, D = k.shape
        R, G = self.residual, self.group
        if T > self.capacity:
            raise RuntimeError(f"QuantKV layer {self.layer}: {T} tokens exceed capacity {self.capacity}")
        held = self._pick_held(k, q_window)  # before rotating: q_window is not rotated
        if self.rotate != "none":
            self.rot = hadamard(D).to(self.device, self.dtype)
        # The prompt is rotated and packed a block of `step` tokens at a time (whole key blocks of R):
        # at 128k a rotated copy of the layer's K and V, and the copies packing makes of it, would be
        # ~1 GiB beside the K/V the model hands us. Rotation, keys' groups and values' rows are all
        # independent across blocks, so the result is the same.
        step = max(R, self.prefill_block // R * R)
        blocks = lambda n: ((a, min(step, n - a)) for a in range(0, n, step))  # noqa: E731
        max_kq, max_vq, window = self._rows(self.capacity, R)
        packed, opts = D * self.bits // 8, dict(device=self.device)
        ranges = torch.uint8 if self.scales == "fp8" else self.dtype
        if self.scales == "fp8":  # fixed here: tokens decoded later are encoded against the same S
            sups = [tuple(map(superscale, self._rotate(k[:, :, a:a + n], v[:, :, a:a + n]))) for a, n in blocks(T)]
            self.k_sup = torch.stack([s_k for s_k, _ in sups]).amax(0)  # the max over blocks is the max
            self.v_sup = torch.stack([s_v for _, s_v in sups]).amax(0)
        self.k_codes = torch.zeros(B, H_kv, max_kq, packed, dtype=torch.uint8, **opts)
        self.k_scale = torch.zeros(B, H_kv, max_kq // G, D, dtype=ranges, **opts)
        self.k_mn = torch.zeros_like(self.k_scale)
        self.v_codes = torch.zeros(B, H_kv, max_vq, packed, dtype=torch.uint8, **opts)
        self.v_scale = torch.zeros(B, H_kv, max_vq, D // G, dtype=ranges, **opts)
        self.v_mn = torch.zeros_like(self.v_scale)
        self.k_res = torch.zeros(B, H_kv, window, D, dtype=self.dtype, **opts)  # (B, H_kv, R, D)
        self.v_res = torch.zeros(B, H_kv, window, D, dtype=self.dtype, **opts)  # ring: token t at t % R

        if held.shape[2]:
            rows = held[..., None].expand(-1, -1, -1, D)
            self.k_held, self.v_held = self._rotate(k.gather(2, rows), v.gather(2, rows))  # (B, H_kv, S, D)
            mask = torch.zeros(B, H_kv, self.capacity, dtype=torch.bool, device=self.device)
            self.held_mask = pack_mask(mask.scatter_(2, held, True))
        n_kq = (T - 1) // R * R  # keep 1..R keys in full precision
        n_vq = max(0, T - R)  # keep the last R values in full precision
        for a, n in blocks(max(n_kq, n_vq)):
            kb, vb = self._rotate(k[:, :, a:a + n], v[:, :, a:a + n])  # (B, H_kv, n, D) each
            if a < n_kq:
                self._pack_keys(kb[:, :, :min(n, n_kq - a)])  # appends: n_kq is a multiple of R, as step
            if a < n_vq:
                nv = min(n, n_vq - a)
                codes, scale, mn = self._quantize(vb[:, :, :nv], per_channel=False)
                self.v_codes[:, :, a:a + nv], self.v_scale[:, :, a:a + nv] = codes, scale
                self.v_mn[:, :, a:a + nv] = mn
        k_tail, v_tail = self._rotate(k[:, :, n_kq:], v[:, :, n_vq:])
        self.k_res[:, :, :T - n_kq] = k_tail
        self.v_res[:, :, torch.arange(n_vq, T, device=self.device) % R] = v_tail
        self.length = T

    def _rotate(self, k: torch.Tensor, v: torch.Tensor, back: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as stored: rotated by R where `rotate` says so (back: by R^T, as they came in)."""
        if self.rotate == "none":
            return k, v
        rot = self.rot.T if back else self.rot
        return (k @ rot if self.rotate == "kv" else k), v @ rot

    def _quantize(self, x: torch.Tensor, per_channel: bool):
        """(codes, scale, mn) of x (B, H_kv, n, D): keys per channel, values per token, with this
        cache's clipping and, with scales="fp8", 8-bit ranges of the superscale fixed at prefill."""
        clip = ("k" if per_channel else "v") in self.clip
        sup = self.k_sup if per_channel else self.v_sup
        if sup is None:
            return quantize_pack(x, self.bits, self.group, per_channel, clip)
        return quantize_pack_fp8(x, self.bits, self.group, per_channel, clip, sup)

    def _dequantize(self, codes, scale, mn, per_channel: bool) -> torch.Tensor:
        sup = self.k_sup if per_channel else self.v_sup
        if sup is None:
            return unpack_dequant(codes, scale, mn, self.bits, self.group, per_channel, self.dtype)
        return unpack_dequant_fp8(codes, scale, mn, self.bits, self.group, per_channel, sup, self.dtype)

    def _pack_keys(self, k: torch.Tensor) -> None:
        """Append a block of keys (B, H_kv, n, D), n a multiple of group, to the packed store."""
        B, H_kv, n, D = k.shape
        G = self.group
        if self.held_mask is not None:  # held keys get no weight from the store: give each the mean
            # of its group's other keys, inside their range, so an outlier widens no group's min/max
            # (the decode kernel still loads them, and gives them no weight)
            a = self.n_kq // 8 * 8  # unpack (B, H_kv, n, 1) from the byte holding token n_kq, not token 0
            held = unpack_mask(self.held_mask[..., a // 8:], self.n_kq + n - a)[:, :, self.n_kq - a:, None]
            kg, hg = k.reshape(B, H_kv, n // G, G, D), held.reshape(B, H_kv, n // G, G, 1)
            mean = kg.masked_fill(hg, 0).sum(3, keepdim=True) / (~hg).sum(3, keepdim=True).clamp(min=1)
            k = torch.where(hg, mean.to(k.dtype), kg).reshape(B, H_kv, n, D)
        codes, scale, mn = self._quantize(k, per_channel=True)
        g0 = self.n_kq // G
        self.k_codes[:, :, self.n_kq:self.n_kq + n] = codes
        self.k_scale[:, :, g0:g0 + n // G] = scale
        self.k_mn[:, :, g0:g0 + n // G] = mn
        self.n_kq += n

    def before_step(self):
        p = self.length  # the coming token's position
        super().before_step()
        if p - self.n_kq == self.residual:  # key residual full: pack it as one block, start a new one
            self._pack_keys(self.k_res)

    def attend(self, q, k_new, v_new, pos):
        # the value leaving the ring packed into its row, the new key and value (rotated as stored)
        # into the windows: kernels/quant_append.py
        quant_append(pos, k_new, v_new, self.k_res, self.v_res, self.v_codes, self.v_scale, self.v_mn,
                     self.bits, self.group, "v" in self.clip, self.v_sup, self.rot, self.rotate)
        # q rotated as the keys are, the output rotated back: inside the kernel on a GPU
        return quant_decode_attention(q, self.k_codes, self.k_scale, self.k_mn, self.k_res, self.v_codes,
                                      self.v_scale, self.v_mn, self.v_res, pos, self.bits, self.group,
                                      k_held=self.k_held, v_held=self.v_held, held_mask=self.held_mask,
                                      k_sup=self.k_sup, v_sup=self.v_sup, rot=self.rot, rotate=self.rotate)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values held, dequantized, in token order: (B, H_kv, length, D) each.
        For analysis and tests (the profiler measures quantization error with it), not decoding."""
        G, R = self.group, self.residual
        n_vq = max(0, self.length - R)
        kq = self._dequantize(self.k_codes[:, :, :self.n_kq], self.k_scale[:, :, :self.n_kq // G],
                              self.k_mn[:, :, :self.n_kq // G], per_channel=True)
        vq = self._dequantize(self.v_codes[:, :, :n_vq], self.v_scale[:, :, :n_vq], self.v_mn[:, :, :n_vq],
                              per_channel=False)
        ring = torch.arange(n_vq, self.length, device=self.device) % R
        k = torch.cat([kq, self.k_res[:, :, :self.length - self.n_kq]], 2)
        v = torch.cat([vq, self.v_res[:, :, ring]], 2)
        if self.k_held is not None:  # the held tokens from their rows, at their positions
            B, H_kv, S, D = self.k_held.shape
            pos = unpack_mask(self.held_mask, self.length).nonzero()[:, 2].view(B, H_kv, S, 1).expand(-1, -1, -1, D)
            k, v = k.scatter(2, pos, self.k_held), v.scatter(2, pos, self.v_held)
        return self._rotate(k, v, back=True)

    def nbytes(self):
        return {"device": tensor_bytes(self.k_codes, self.k_scale, self.k_mn, self.v_codes, self.v_scale,
                                       self.v_mn, self.k_res, self.v_res, self.rot, self.k_held, self.v_held,
                                       self.held_mask, self.k_sup, self.v_sup),
                "host": 0}

    @classmethod
    def _cost(cls, args, prompt, new, elem, *, bits, group, residual, rotate, sink, heavy, scales, **_):
        # clip changes which ranges are stored, not how many bytes
        H, D = args.n_kv_heads, args.head_dim
        scales = cls._ranges(scales, bits)
        bits, G, R = cls._check(D, bits, group, residual, scales)
        rotate = cls._rotation(rotate, D)
        max_kq, max_vq, window = cls._rows(prompt + new, R)
        codes = H * (max_kq + max_vq) * D * bits // 8
        ranges = 2 * H * (max_kq // G * D + max_vq * (D // G)) * (1 if scales == "fp8" else elem)  # scale, min
        ranges += 2 * H * 4 if scales == "fp8" else 0  # the float32 superscales of K and V
        rot = D * D * elem if rotate != "none" else 0
        S = cls.n_held(prompt, sink, heavy)
        held = 2 * H * S * D * elem + (H * -(-(prompt + new) // 8) if S else 0)  # rows + bit mask
        return {"device": codes + ranges + 2 * H * window * D * elem + rot + held, "host": 0}

    def describe(self):
        return {"policy": self.name, "bits": self.bits, "group": self.group, "residual": self.residual,
                "rotate": self.rotate, "sink": self.sink, "clip": self.clip, "heavy": self.heavy,
                "scales": self.scales}
