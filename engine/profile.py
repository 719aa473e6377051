"""Per-layer attention statistics from one profiling prefill (XKV's "mini-prefill"), the input of
the planner. Each layer's policy during that prefill is a `ProfileKV`, which measures and keeps
nothing else, so profiling needs no hooks in the model and only one layer's K/V at a time.

Measured per layer, from the prompt's last `window` queries (causal inside the window):
  dense        TailorKV's density: attention mass outside each query's top 5% keys (mean over
               queries and heads). High = dense = quantize; low = sparse = retrieve or evict.
  evict[i]     XKV's importance retention R(k) for k = FRACTIONS[i] of the prompt: the share of the
               pooled window attention (BudgetedEvictKV's own score) that its top k tokens hold,
               i.e. what static eviction to k tokens keeps.
  offload[i]   what OffloadKV keeps at the same budgets: each query's exact attention mass on the
               tokens it would fetch (sink + recent + top by the C-channel sketch's scores).
  quant_err[b] relative error of the attention output when K/V are stored at b bits (QuantKV).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from engine.kv.base import KVPolicy
from engine.kv.evict import window_scores
from engine.kv.offload import rank_channels
from engine.kv.quant import QuantKV

FRACTIONS = [i / 64 for i in range(65)]  # budgets as fractions of the prompt, 0 .. 1
QUANT_BITS = (1, 2, 4)


@dataclass
class LayerStats:
    dense: float
    evict: list[float]
    offload: list[float]
    quant_err: dict[int, float]


@dataclass
class ProfileConfig:
    window: int = 32           # last prompt queries that are measured (TailorKV uses 32)
    pool: int = 7              # eviction score smoothing, as BudgetedEvictKV
    sink: int = 16             # OffloadKV's always-kept tokens, as its defaults
    recent: int = 64
    channels: int = 8
    quant_group: int = 64
    quant_residual: int = 128


def _causal_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, w, D) are the last w positions of a T-token prompt; k (B, H_kv, T, D)
    -> probabilities (B, H_kv, n_rep, w, T) float32, causal inside the window."""
    B, H, w, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    qg = q.reshape(B, H_kv, H // H_kv, w, D).float()
    logits = torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2)) / math.sqrt(D)
    future = torch.arange(T, device=k.device)[None, :] > torch.arange(T - w, T, device=k.device)[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def _attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (B, H_kv, n_rep, w, T), v (B, H_kv, T, D) -> (B, H_kv, n_rep, w, D)."""
    return torch.matmul(probs, v.float()[:, :, None])


def layer_stats(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, args, cfg: ProfileConfig) -> LayerStats:
    B, H_kv, T, D = k.shape
    w = q.shape[2]
    probs = _causal_probs(q, k)  # (B, H_kv, n_rep, w, T)

    # TailorKV density: mass outside the top 5% of keys
    top5 = max(1, math.ceil(0.05 * T))
    dense = (1 - probs.topk(top5, dim=-1).values.sum(-1)).mean().item()

    # XKV retention of static eviction, by BudgetedEvictKV's own pooled score
    mass = window_scores(k, q, cfg.pool)  # (B, H_kv, T)
    csum = torch.cat([mass.new_zeros(B, H_kv, 1), mass.sort(dim=-1, descending=True).values.cumsum(-1)], -1)
    evict = [(csum[..., round(f * T)] / csum[..., -1]).mean().item() for f in FRACTIONS]

    # OffloadKV: sink + recent always, the middle ranked per query by the channel sketch
    S, W = min(cfg.sink, T), min(cfg.recent, max(0, T - cfg.sink))
    M = T - S - W
    fixed = probs[..., :S].sum(-1) + probs[..., T - W:].sum(-1)  # (B, H_kv, n_rep, w)
    offload = []
    if M > 0:
        mid_k = k[:, :, S:T - W]
        chan = rank_channels(mid_k, q, cfg.channels)  # (B, H_kv, C)
        qg = q.reshape(B, H_kv, -1, w, D).float()
        qc = qg.gather(-1, chan[:, :, None, None, :].expand(-1, -1, qg.shape[2], w, -1))
        kc = mid_k.float().gather(-1, chan[:, :, None, :].expand(-1, -1, M, -1))  # (B, H_kv, M, C)
        approx = torch.matmul(qc, kc[:, :, None].transpose(-1, -2)).amax(dim=2)  # (B, H_kv, w, M)
        order = approx.argsort(dim=-1, descending=True)[:, :, None].expand(-1, -1, qg.shape[2], -1, -1)
        got = probs[..., S:T - W].gather(-1, order).cumsum(-1)  # mass of the top-j tokens, j = 1..M
        got = torch.cat([got.new_zeros(got.shape[:-1] + (1,)), got], -1)
    for f in FRACTIONS:
        extra = min(M, max(0, round(f * T) - S - W)) if M > 0 else 0
        kept = fixed + (got[..., extra] if M > 0 else 0)
        offload.append(min(1.0, kept.mean().item()) if round(f * T) >= S + W or M <= 0 else 0.0)

    # QuantKV: attention output error of the window queries at each bit width
    exact = _attend(probs, v)
    quant_err = {}
    for bits in QUANT_BITS:
        qkv = QuantKV(args, 0, T, k.device, k.dtype, bits=bits, group=cfg.quant_group,
                      residual=cfg.quant_residual, batch=B)
        qkv.prefill(k, v)
        kh, vh = qkv.dequantized()
        approx_out = _attend(_causal_probs(q, kh), vh)
        quant_err[bits] = ((approx_out - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-9)).mean().item()
    return LayerStats(dense, evict, offload, quant_err)


class ProfileKV(KVPolicy):
    """A measuring stand-in for a layer's policy during the profiling prefill."""
    name = "profile"

    def __init__(self, args, layer, capacity, device, dtype, cfg: ProfileConfig | None = None):
        super().__init__(args, layer, capacity, device, dtype)
        self.cfg = cfg or ProfileConfig()
        self.q_window = self.cfg.window
        self.stats: LayerStats | None = None

    def prefill(self, k, v, q_window=None):
        self.stats = layer_stats(k, v, q_window, self.args, self.cfg)
        self.length = k.shape[2]

    def attend(self, q, k_new, v_new):
        raise RuntimeError("ProfileKV only measures a prefill; it cannot decode")

    def nbytes(self):
        return {"device": 0, "host": 0}


@torch.inference_mode()
def profile_prompt(model, ids: list[int], cfg: ProfileConfig | None = None, progress=None) -> list[LayerStats]:
    """One profiling prefill over `ids`: per-layer statistics."""
    device = model.head.device
    policies = [ProfileKV(model.args, i, len(ids), device, model.head.dtype, cfg)
                for i in range(model.args.n_layers)]
    model.prefill(torch.tensor([ids], device=device), policies, progress=progress)
    return [p.stats for p in policies]


def average(profiles: list[list[LayerStats]]) -> list[LayerStats]:
    """Mean over several prompts' profiles, layer by layer."""
    n = len(profiles)
    out = []
    for layer in zip(*profiles):
        out.append(LayerStats(
            dense=sum(s.dense for s in layer) / n,
            evict=[sum(vals) / n for vals in zip(*(s.evict for s in layer))],
            offload=[sum(vals) / n for vals in zip(*(s.offload for s in layer))],
            quant_err={b: sum(s.quant_err[b] for s in layer) / n for b in layer[0].quant_err}))
    return out


def stats_to_json(stats: list[LayerStats]) -> list[dict]:
    return [asdict(s) for s in stats]


def stats_from_json(rows: list[dict]) -> list[LayerStats]:
    return [LayerStats(r["dense"], r["evict"], r["offload"], {int(b): e for b, e in r["quant_err"].items()})
            for r in rows]
