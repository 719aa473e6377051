"""Per-layer attention statistics from one short profiling run (XKV's "mini-prefill"), the input
of the planner. During it every layer's policy is a `ProfileKV`: a FullKV that also records the
prompt's last `window` queries at prefill and the queries of a few greedy decode steps after it.
No hooks in the model are needed.

What a policy keeps is chosen from the prompt (as the real policies choose at prefill) and judged on
the *decode* queries (the ones that will need the tokens), per layer:
  dense        TailorKV's density: attention mass outside each prompt query's top 5% keys (mean
               over the window and heads). High = dense = quantize; low = sparse = retrieve/evict.
  evict[i]     importance retention R(k) (XKV) for k = FRACTIONS[i] of the prompt: the decode
               queries' attention mass on what BudgetedEvictKV keeps at that budget.
  offload[i]   the same for OffloadKV: each decode query's mass on the tokens it would fetch
               (sink + recent + the top chunks by the C-channel sketch's approximate scores).
  quant_err[b] relative error of the decode queries' attention output with K/V at b bits.
Judging static eviction on the prompt queries that chose its tokens would flatter it: on pass-key
prompts those queries keep the needle, the answer's queries then miss a digit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from engine.graphs import Decoder
from engine.kv.evict import BudgetedEvictKV, window_scores
from engine.kv.full import FullKV
from engine.kv.offload import OffloadKV, chunk_sketch, rank_channels
from engine.kv.quant import QuantKV
from kernels.sparse_attn import sketch_scores

FRACTIONS = [i / 64 for i in range(65)]  # budgets as fractions of the prompt, 0 .. 1
QUANT_BITS = (1, 2, 4)


@dataclass
class LayerStats:
    dense: float
    evict: list[float]
    offload: list[float]
    quant_err: dict[int, float]


def _pick(defaults: dict, *keys: str) -> dict:
    return {k: defaults[k] for k in keys}


@dataclass
class ProfileConfig:
    """How the profile judges each policy: with the parameters the planner will give it, which are
    the policies' own defaults (read from their constructors) unless changed here."""
    probe: int = 16  # greedy decode steps whose queries judge the policies
    evict: dict = field(default_factory=lambda: _pick(BudgetedEvictKV.defaults(), "window", "pool"))
    offload: dict = field(default_factory=lambda: _pick(OffloadKV.defaults(), "sink", "recent", "channels",
                                                                       "chunk"))
    quant: dict = field(default_factory=lambda: _pick(QuantKV.defaults(), "group", "residual", "rotate", "sink",
                                                      "clip", "heavy"))

    @property
    def window(self) -> int:
        """Prompt queries the profile records: what eviction scores with and OffloadKV ranks channels by."""
        return max(self.evict["window"], OffloadKV.q_window)


def _causal_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, n, D) are the last n positions of the T keys k (B, H_kv, T, D)
    -> probabilities (B, H_kv, n_rep, n, T) float32, causal."""
    B, H, n, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    qg = q.reshape(B, H_kv, H // H_kv, n, D).float()
    logits = torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2)) / math.sqrt(D)
    future = torch.arange(T, device=k.device)[None, :] > torch.arange(T - n, T, device=k.device)[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def _attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (B, H_kv, n_rep, n, T), v (B, H_kv, T, D) -> (B, H_kv, n_rep, n, D)."""
    return torch.matmul(probs, v.float()[:, :, None])


def _mass_in_order(probs: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """probs (B, H_kv, n_rep, n, M) over M candidates, order (B, H_kv, [n,] M) best first
    -> (..., M + 1): the mass on the best j candidates, j = 0..M."""
    if order.dim() == 3:
        order = order[:, :, None, None]
    else:
        order = order[:, :, None]
    got = probs.gather(-1, order.expand(probs.shape)).cumsum(-1)
    return torch.cat([got.new_zeros(got.shape[:-1] + (1,)), got], -1)


def layer_stats(k: torch.Tensor, v: torch.Tensor, T: int, q_prompt: torch.Tensor, q_dec: torch.Tensor,
                args, cfg: ProfileConfig) -> LayerStats:
    """k, v (B, H_kv, T + n, D): a T-token prompt and n decoded tokens; q_prompt (B, H, w, D) the
    prompt's last queries, q_dec (B, H, n, D) the decode queries."""
    B, H_kv, _, D = k.shape
    n = q_dec.shape[2]
    dec = _causal_probs(q_dec, k)  # (B, H_kv, n_rep, n, T + n)
    generated = dec[..., T:].sum(-1)  # every policy keeps the decoded tokens

    top5 = max(1, math.ceil(0.05 * T))
    dense = (1 - _causal_probs(q_prompt, k[:, :, :T]).topk(top5, dim=-1).values.sum(-1)).mean().item()

    # BudgetedEvictKV: top tokens before the window by the prompt's pooled scores, plus the window
    W = min(cfg.evict["window"], T)
    mass = window_scores(k[:, :, :T], q_prompt[:, :, -cfg.evict["window"]:], cfg.evict["pool"])  # (B, H_kv, T)
    order = mass[:, :, :T - W].argsort(dim=-1, descending=True)
    got = _mass_in_order(dec[..., :T - W], order)
    base = generated + dec[..., T - W:T].sum(-1)
    # At a budget of k = round(f * T) prompt tokens BudgetedEvictKV keeps the W window tokens plus
    # the best k - W candidates, and got[..., j] is the mass on the best j: so the index is k - W,
    # clamped to [0, T - W]. E.g. T = 1000, W = 32, f = 0.25: k = 250, the window + 218 candidates.
    evict = [(base + got[..., min(T - W, max(0, round(f * T) - W))]).mean().item() for f in FRACTIONS]

    # OffloadKV: sink + recent, and per decode query the top chunks of the middle by the sketch
    sink, recent, c = cfg.offload["sink"], cfg.offload["recent"], cfg.offload["chunk"]
    S, M, R, _ = OffloadKV.layout(T, 0, sink, recent, c)  # budget 0: the middle in whole chunks
    if M > 0:
        mid_k = k[:, :, S:S + M].float()
        chan = rank_channels(mid_k, q_prompt[:, :, -OffloadKV.q_window:], cfg.offload["channels"])  # (B, H_kv, C)
        mn, mx = chunk_sketch(mid_k, chan, c)  # (B, H_kv, N, C), N = M // c chunks
        qg = q_dec.reshape(B, H_kv, -1, D)  # (B, H_kv, n_rep * n, D), rows (head, query)
        qc = qg.gather(-1, chan[:, :, None, :].expand(-1, -1, qg.shape[2], -1))
        approx = sketch_scores(qc, mn, mx).view(B, H_kv, -1, n, M // c).amax(dim=2)  # (B, H_kv, n, N)
        chunk_mass = dec[..., S:S + M].unflatten(-1, (M // c, c)).sum(-1)  # (B, H_kv, n_rep, n, N)
        taken = _mass_in_order(chunk_mass, approx.argsort(dim=-1, descending=True))  # best j chunks
        fixed = generated + dec[..., :S].sum(-1) + dec[..., S + M:T].sum(-1)
    offload = []
    for f in FRACTIONS:
        k_f = round(f * T)
        _, _, _, top = OffloadKV.layout(T, k_f, sink, recent, c)
        if M <= 0 or top >= M:
            offload.append(1.0)
        elif k_f < sink + recent:
            offload.append(0.0)  # below sink + recent: not a valid OffloadKV budget
        else:
            offload.append(min(1.0, (fixed + taken[..., top // c]).mean().item()))

    # QuantKV over the prompt (decoded tokens stay in its full-precision residual here)
    exact = _attend(dec, v)
    quant_err = {}
    for bits in QUANT_BITS:
        qkv = QuantKV(args, 0, T, k.device, k.dtype, bits=bits, **cfg.quant)
        qkv.prefill(k[:, :, :T], v[:, :, :T], q_prompt[:, :, -qkv.q_window:] if qkv.q_window else None)
        kh, vh = qkv.dequantized()
        kh, vh = torch.cat([kh, k[:, :, T:]], 2), torch.cat([vh, v[:, :, T:]], 2)
        approx_out = _attend(_causal_probs(q_dec, kh), vh)
        quant_err[bits] = ((approx_out - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-9)).mean().item()
    return LayerStats(dense, evict, offload, quant_err)


class ProfileKV(FullKV):
    """FullKV that records the prompt's last queries and every decode query, for layer_stats."""
    name = "profile"
    graphable = False  # it records every decode query on the host side: eager steps only

    def __init__(self, args, layer, capacity, device, dtype, cfg: ProfileConfig | None = None):
        super().__init__(args, layer, capacity, device, dtype)
        self.cfg = cfg or ProfileConfig()
        self.q_window = self.cfg.window
        self.prompt_len = 0
        self.q_prompt, self.q_dec = None, []

    def prefill(self, k, v, q_window=None):
        super().prefill(k, v)
        self.prompt_len, self.q_prompt = k.shape[2], q_window

    def attend(self, q, k_new, v_new, pos):
        self.q_dec.append(q)
        return super().attend(q, k_new, v_new, pos)

    def stats(self) -> LayerStats:
        return layer_stats(self.k[:, :, :self.length], self.v[:, :, :self.length], self.prompt_len,
                           self.q_prompt, torch.cat(self.q_dec, 2), self.args, self.cfg)


@torch.inference_mode()
def profile_prompt(model, ids: list[int], cfg: ProfileConfig | None = None, progress=None) -> list[LayerStats]:
    """Prefill `ids` under ProfileKV, decode cfg.probe greedy tokens, return per-layer statistics."""
    cfg = cfg or ProfileConfig()
    device = model.head.device
    policies = [ProfileKV(model.args, i, len(ids) + cfg.probe, device, model.head.dtype, cfg)
                for i in range(model.args.n_layers)]
    logits = model.prefill(torch.tensor([ids], device=device), policies, progress=progress)
    decoder = Decoder(model, policies)  # eager: ProfileKV is not graphable
    for i in range(cfg.probe):
        logits = decoder.step(logits.argmax(-1), len(ids) + i)
    return [p.stats() for p in policies]


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
