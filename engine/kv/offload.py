"""OffloadKV: the prompt's K/V live in host memory; each decode step fetches only the tokens the
current query needs (TailorKV's "sparsity-friendly" layers).

On the device stay: the first `sink` tokens, the prompt's last `recent` tokens, every generated
token, the `budget - sink - recent` prompt tokens selected at the last step, and a key *sketch* of
the middle of the prompt. The middle is cut into chunks of `chunk` consecutive tokens, selected
whole (ShadowKV, Quest): chunk x fewer candidates to score and rank, and each selected chunk is one
contiguous run of rows to copy. The sketch keeps, per chunk, the min and max of the `channels`
most important key channels as 4-bit codes (kernels/sparse_attn.py: with chunk 1 these are the
keys' channels themselves). By default channels is a quarter of head_dim, half a byte each: a
sixteenth of a bfloat16 key row per token (Llama-3.1-8B: 32 of 128 channels, 16 bytes, what the 8
channels in bfloat16 of the sketch before 2026-11-29 took; they ranked worse: kernels/sparse_attn.py).
Half of head_dim answered no better on the default model's task suite, 64 prompts at 4k and 8k
(docs/RESULTS.md, "16 against 32 channels"), for twice the bytes.
Each step:
  1. approximate scores over the middle's chunks from the sketch (no host traffic);
  2. top-k chunks per KV head (the max over the query heads that share it);
  3. a slot whose chunk is still selected keeps it; only the newly selected chunks' rows cross the
     bus from the host store, into the freed slots (kernels/slots.py);
  4. exact attention over [sink | selected slots | recent | generated].
Worked example, budget 2048, sink 16, recent 64, chunk 16, a 131072-token prompt: the middle is
130992 tokens = 8187 chunks; 1968 // 16 = 123 chunks (1968 rows) are selected per KV head and step.
(A middle that does not divide into chunks hands its last `M % chunk` tokens to the recent part.)
When the budget covers the prompt nothing is offloaded and the buffer is FullKV's, bit for bit.
With reuse off (the baseline that refetches every selected row each step) the slots are assigned
the same way, so reuse changes what is copied, never a result.

The host store (`host`) holds the offloaded rows as 8-bit codes with a min and step per channel
("8bit", the default; kernels/host_store.py): half the bytes of bfloat16 per fetched row and half
the host memory. On the default model (4k pass-key grid, KL over 256 tokens) it changed nothing
measurable: KL 0.0614 -> 0.0612 at budget 256, 0.1588 -> 0.1585 at 128, 20/20 pass keys either way.
"model" keeps the model's values. The sketch, the sink, recent and generated tokens are made from
the exact keys and values either way.

Channels are chosen once at prefill per KV head by mean|q| (over the prompt's last queries) x
max|K| (over the middle tokens), TailorKV's criterion; keeping them fixed is what lets the sketch
stay on the device instead of gathering C channels from host memory every step as their code does.

When is the selection made? (`lookahead`), which decides whether it can overlap compute:
  "none"   this step's query, at this layer: exact, but selection and copy sit on the critical path;
  "layer"  an approximate query made one layer early (InfiniGen's idea): the model projects the
           previous layer's input through this layer's norm, Wq and RoPE (the residual stream
           changes little from one layer to the next), so the fetch runs while the previous layer
           computes;
  "step"   the previous step's selection: attention uses the rows chosen by the last query, and
           the rows for the next step are fetched right after attending, hidden behind the rest
           of this step (every fetch is joined when the step ends, as a CUDA graph requires: the
           last layer's has nothing left to hide behind).
With "layer" and "step" on CUDA the whole selection (scores, top-k, slot assignment, copy) runs
on a side stream (kernels.prefetch), the copy optionally on only `copy_programs` SMs so that the
compute it hides behind keeps the rest; on CPU everything runs in order, with the same results.
"""
from __future__ import annotations

import torch

from engine.kv.base import KVPolicy, tensor_bytes
from kernels.dense_attn import dense_decode_attention, write_row
from kernels.host_store import HOST
from kernels.prefetch import RowFetcher
from kernels.slots import assign_slots
from kernels.sparse_attn import Sketch, approx_scores, make_sketch, select_topk, sketch_bytes


def rank_channels(mid_k: torch.Tensor, q_window: torch.Tensor | None, channels: int) -> torch.Tensor:
    """(B, H_kv, C) sorted channel ids with the largest mean|q| * max|K| per KV head: a channel
    matters for q.k when the query weighs it and the keys are large in it.
    mid_k (B, H_kv, M, D); q_window (B, H, w, D), |q| averaged over the window and the group."""
    B, H_kv, _, D = mid_k.shape
    weight = torch.maximum(mid_k.amax(dim=2), -mid_k.amin(dim=2)).float()  # (B, H_kv, D) max|K|, no |K| copy
    if q_window is not None:
        weight = weight * q_window.abs().reshape(B, H_kv, -1, D).float().mean(dim=2)
    return weight.topk(channels, dim=-1).indices.sort(dim=-1).values


LOOKAHEAD = ("none", "layer", "step")


class OffloadKV(KVPolicy):
    name = "offload"
    q_window = 32  # prompt queries used to rank channels

    def __init__(self, args, layer, capacity, device, dtype, budget: int = 512, sink: int = 16,
                 recent: int = 64, channels: int = 0, chunk: int = 1, reuse: bool = True,
                 lookahead: str = "none", overlap: bool = True, copy_programs: int = 0, host: str = "8bit"):
        super().__init__(args, layer, capacity, device, dtype)
        if min(budget, sink, recent) < 0:
            raise ValueError(f"OffloadKV budget/sink/recent must be >= 0, got {budget}/{sink}/{recent}")
        if chunk < 1:
            raise ValueError(f"OffloadKV chunk must be >= 1, got {chunk}")
        if budget < sink + recent:
            raise ValueError(f"OffloadKV budget {budget} < sink {sink} + recent {recent}")
        channels = self.sketch_channels(args, channels)
        if not 1 <= channels <= args.head_dim:
            raise ValueError(f"OffloadKV channels must be in [1, head_dim={args.head_dim}] (0: head_dim // 4), "
                             f"got {channels}")
        if copy_programs < 0:
            raise ValueError(f"OffloadKV copy_programs must be >= 0 (0: no cap), got {copy_programs}")
        if host not in HOST:
            raise ValueError(f"OffloadKV host must be one of {', '.join(HOST)}, got {host!r}")
        if lookahead not in LOOKAHEAD:
            raise ValueError(f"OffloadKV lookahead must be one of {', '.join(LOOKAHEAD)}, got {lookahead!r}")
        self.budget, self.sink, self.recent, self.channels, self.reuse = budget, sink, recent, channels, reuse
        self.chunk = chunk
        self.lookahead, self.overlap = lookahead, overlap
        self.copy_programs = copy_programs  # cap on the overlapped copy's programs (kernels/prefetch.py)
        self.host = host  # the host store: the model's values or 8-bit codes (kernels/host_store.py)
        self.prepared = False           # "layer": this step's rows were selected one layer early
        self.k = self.v = None          # device buffer (B, H_kv, n_dev_max, D), token order
        self.sketch: Sketch | None = None  # per chunk, min and max of C key channels (4-bit codes)
        self.fetcher: RowFetcher | None = None
        self.slots = None               # (B, H_kv, k) the middle chunk held in each device slot (-1: free)
        self.selected = False           # whether a decode step has selected chunks yet

    @staticmethod
    def sketch_channels(args, channels: int) -> int:
        """The sketch's channel count: `channels`, or a quarter of head_dim for 0 (the default)."""
        return channels if channels else max(1, args.head_dim // 4)

    @staticmethod
    def layout(T: int, budget: int, sink: int, recent: int, chunk: int) -> tuple[int, int, int, int]:
        """A T-token prompt -> (S, M, W, top): S sink tokens, a middle of M, W recent, and `top`
        middle tokens held on the device (top == M: nothing offloaded; else whole chunks)."""
        S = min(sink, T)
        W = min(recent, T - S)
        M = T - S - W  # middle of the prompt: the offloadable part
        top = budget - sink - recent
        if top >= M:
            return S, M, W, M
        W, M = W + M % chunk, M - M % chunk  # the middle in whole chunks
        return S, M, W, min(top // chunk, M // chunk) * chunk

    def prefill(self, k, v, q_window=None):
        B, H_kv, T, D = k.shape
        S, M, W, self.top = self.layout(T, self.budget, self.sink, self.recent, self.chunk)
        self.offloaded = self.top < M
        n_prompt = S + self.top + W
        n_max = n_prompt + (self.capacity - T)          # + room for every token yet to be generated
        self.k = torch.empty(B, H_kv, n_max, D, device=self.device, dtype=self.dtype)
        self.v = torch.empty_like(self.k)
        self.S, self.M = S, M
        self.k[:, :, :S], self.v[:, :, :S] = k[:, :, :S], v[:, :, :S]
        self.k[:, :, S + self.top:n_prompt] = k[:, :, T - W:]
        self.v[:, :, S + self.top:n_prompt] = v[:, :, T - W:]
        if not self.offloaded:  # everything fits: the middle simply stays, in order
            self.k[:, :, S:S + M], self.v[:, :, S:S + M] = k[:, :, S:T - W], v[:, :, S:T - W]
        else:
            mid_k, mid_v = k[:, :, S:T - W], v[:, :, S:T - W]  # (B, H_kv, M, D)
            self.fetcher = RowFetcher(mid_k, mid_v, self.device, self.copy_programs, self.host)
            self.sketch = make_sketch(mid_k, rank_channels(mid_k, q_window, self.channels), self.chunk)
            # chunk ids per device slot, all free until the first decode step's query selects (allocated
            # here so that the cache's bytes are what _cost says from the prefill on)
            self.slots = torch.full((B, H_kv, self.top // self.chunk), -1, device=self.device, dtype=torch.long)
            self.selected = False
        self.row_offset = n_prompt - T  # buffer row of decode position p is p + row_offset
        self.length = T

    def _select(self, q: torch.Tensor, overlap: bool) -> None:
        """Bring the top-k middle tokens for query q (B, H, 1, D) into the device buffer's k slots.
        With overlap on CUDA the whole selection (scores, top-k, slot assignment and the copy, on
        at most `copy_programs` programs) is only queued on the fetcher's side stream, behind the
        compute queued so far: `self.fetcher.wait()` before reading the buffer."""
        if overlap and self.overlap and self.fetcher.cuda:
            with self.fetcher.side(q):
                self._choose_and_copy(q, self.copy_programs)
        else:
            self._choose_and_copy(q, 0)

    def _choose_and_copy(self, q: torch.Tensor, programs: int) -> None:
        scores = approx_scores(q, self.sketch)  # (B, H_kv, N) one per chunk
        new = select_topk(scores, self.top // self.chunk)  # (B, H_kv, k) sorted chunk ids
        self.selected = True  # (on the first step every slot is free: filled with the selected chunks in order)
        # Slots whose chunk is still selected keep it; only new chunks' rows cross the bus
        # (kernels/slots.py, with a worked example).
        rows, wanted = assign_slots(self.slots, new, self.chunk, self.reuse)  # (B, H_kv, top) each
        # rows are in slot order: entry j goes to device row S + j (slots=None)
        self.fetcher.copy(rows, wanted, None, self.k, self.v, self.S, programs)

    def wants_lookahead(self) -> bool:
        return self.offloaded and self.lookahead == "layer"

    def prepare(self, q_hat: torch.Tensor) -> None:
        """Called by the model at the start of the previous layer with this layer's approximate query."""
        self._select(q_hat, overlap=True)
        self.prepared = True

    def _before_attention(self, q) -> bool:
        """Make sure this step's rows are in place; True on the first decode step."""
        first = not self.selected
        if self.lookahead == "none" or first or (self.lookahead == "layer" and not self.prepared):
            self._select(q, overlap=False)  # exact: this query, copy on the critical path
        self.prepared = False
        self.fetcher.wait()
        return first

    def _after_attention(self, q, first: bool) -> None:
        if self.lookahead == "step" and not first:  # the next step's rows, fetched while we go on
            self._select(q, overlap=True)

    def attend(self, q, k_new, v_new, pos):
        write_row(self.k, self.v, k_new, v_new, pos, self.row_offset)  # this token's row: pos + row_offset
        first = self.offloaded and self._before_attention(q)
        out = dense_decode_attention(q, self.k, self.v, pos, self.row_offset)
        if self.offloaded:
            self._after_attention(q, first)
        return out

    def finish_step(self):
        if self.fetcher is not None:
            self.fetcher.wait()

    def nbytes(self):
        device = tensor_bytes(self.k, self.v, self.slots) + (self.sketch.nbytes() if self.sketch else 0)
        store = self.fetcher.nbytes() if self.fetcher is not None else {"device": 0, "host": 0}
        return {"device": device + store["device"], "host": store["host"]}

    @classmethod
    def _cost(cls, args, prompt, new, elem, *, budget, sink, recent, channels, chunk, host, **_):
        H, D = args.n_kv_heads, args.head_dim
        S, M, W, top = cls.layout(prompt, budget, sink, recent, chunk)
        device = (S + top + W + new) * 2 * H * D * elem
        if top == M:  # nothing offloaded
            return {"device": device, "host": 0}
        # + the sketch (kernels/sparse_attn.py) and the slots' chunk ids (int64)
        device += sketch_bytes(H, M // chunk, cls.sketch_channels(args, channels), chunk > 1) + H * (top // chunk) * 8
        if host == "8bit":  # one byte per element on the host; a step and a min per channel of K and V on the device
            return {"device": device + 4 * H * D * 4, "host": 2 * H * M * D}
        return {"device": device, "host": 2 * H * M * D * elem}

    def transfer_bytes(self):
        return self.fetcher.bytes_copied if self.fetcher is not None else 0

    def describe(self):
        return {"policy": self.name, "budget": self.budget, "sink": self.sink, "recent": self.recent,
                "channels": self.channels, "chunk": self.chunk, "lookahead": self.lookahead,
                "copy_programs": self.copy_programs, "host": self.host}
