"""Per-layer attention statistics from one short profiling run (XKV's "mini-prefill"), the input
of the planner. During it every layer's policy is a `ProfileKV`: a FullKV that also records the
prompt's last `window` queries at prefill and the queries of a few greedy decode steps after it.
No hooks in the model are needed.

What a policy keeps is chosen from the prompt (as the real policies choose at prefill) and judged on
the *decode* queries (the ones that will need the tokens), per layer:
  dense          TailorKV's density: attention mass outside each prompt query's top 5% keys (mean
                 over the window and heads). High = dense = quantize; low = sparse = retrieve/evict.
  evict[i]       importance retention R(k) (XKV) for k = FRACTIONS[i] of the prompt: the decode
                 queries' attention mass on what BudgetedEvictKV keeps at that budget (XKV's modes).
  evict_err[i]   relative error of the decode queries' attention output under that eviction.
  offload_err[i] the same for OffloadKV at that budget: each decode query attends to the tokens it
                 would fetch (sink + recent + the top chunks by the C-channel sketch's scores).
  quant_err[b]   the same with K/V at b bits.
  harm           per kind, what a unit of that error costs in KL at the output (engine/calibrate.py).
Judging static eviction on the prompt queries that chose its tokens would flatter it: on pass-key
prompts those queries keep the needle, the answer's queries then miss a digit.

Why errors, not retention, price the hybrid: kept mass is not what a layer passes on. In layer 0 of
the default model (4k of GPL-3) eviction to 10% keeps 0.44 of the decode queries' mass, yet its
output is off by 0.15 (diffuse attention over similar values: a sample averages like the whole);
priced by mass, a 10% plan spent its bytes on such layers (KL 0.218); priced by error, 0.185.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from engine.calibrate import calibrate
from engine.graphs import Decoder
from engine.kv.evict import BudgetedEvictKV, window_scores
from engine.kv.full import FullKV
from engine.kv.offload import OffloadKV, rank_channels
from engine.kv.quant import QuantKV
from engine.layer_stats import FRACTIONS, QUANT_BITS, LayerStats
from kernels.host_store import dequantize_channels, quantize_channels
from kernels.sparse_attn import make_sketch, sketch_scores

def _pick(defaults: dict, *keys: str) -> dict:
    return {k: defaults[k] for k in keys}


@dataclass
class ProfileConfig:
    """How the profile judges each policy: with the parameters the planner will give it, which are
    the policies' own defaults (read from their constructors) unless changed here."""
    probe: int = 16  # greedy decode steps whose queries judge the policies
    evict: dict = field(default_factory=lambda: _pick(BudgetedEvictKV.defaults(), "window", "pool"))
    offload: dict = field(default_factory=lambda: _pick(OffloadKV.defaults(), "sink", "recent", "channels",
                                                                       "chunk", "host"))
    quant: dict = field(default_factory=lambda: _pick(QuantKV.defaults(), "group", "residual", "rotate", "sink",
                                                      "clip", "heavy"))
    calibrate: tuple[str, ...] = ("evict", "offload", "quant")  # the kinds calibrate() measures

    @property
    def window(self) -> int:
        """Prompt queries the profile records: what eviction scores with and OffloadKV ranks channels by."""
        return max(self.evict["window"], OffloadKV.q_window)


def _causal_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, n, D) are the last n positions of the T keys k (B, H_kv, T, D)
    -> probabilities (B, H_kv, n_rep, n, T) float32, causal."""
    B, H, n, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    # the group's query heads as rows of one matmul: broadcasting k over them would copy it n_rep times
    qg = q.reshape(B, H_kv, H // H_kv * n, D).float()
    logits = (torch.matmul(qg, k.float().transpose(-1, -2)) / math.sqrt(D)).view(B, H_kv, H // H_kv, n, T)
    future = torch.arange(T, device=k.device)[None, :] > torch.arange(T - n, T, device=k.device)[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def _attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (B, H_kv, n_rep, n, T), v (B, H_kv, T, D) -> (B, H_kv, n_rep, n, D)."""
    B, H_kv, n_rep, n, T = probs.shape
    return torch.matmul(probs.reshape(B, H_kv, n_rep * n, T), v.float()).view(B, H_kv, n_rep, n, -1)


def _rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean relative error of attention outputs (..., D): the one currency every option is priced in."""
    return ((approx - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-9)).mean().item()


def _host_stored(x: torch.Tensor, S: int, M: int) -> torch.Tensor:
    """x (B, H_kv, T + n, D) -> float32, its middle [S, S + M) as OffloadKV's 8-bit host store gives
    it back (kernels/host_store.py)."""
    out = x.float().clone()
    out[:, :, S:S + M] = dequantize_channels(*quantize_channels(x[:, :, S:S + M]))
    return out


def _outputs_in_order(num, den, probs, vals, cuts):
    """Attention outputs as the best candidates join, one output per cut.

    num (..., n, D), den (..., n, 1): the sum of p_t v_t and of p_t over what is always kept;
    probs (..., n, M) the candidates' probabilities and vals (..., M, D) their values, both sorted
    best first; cuts: candidate counts, non-decreasing. Yields the renormalised output
    (num + sum_{j < cut} p_j v_j) / (den + sum_{j < cut} p_j) for each cut: the attention output
    of a policy that keeps those candidates. One pass over the candidates (segment by segment),
    never a (cuts x M) matrix: at 128k that would not fit."""
    a = 0
    for b in cuts:
        if b > a:
            num = num + torch.matmul(probs[..., a:b], vals[..., a:b, :])
            den = den + probs[..., a:b].sum(-1, keepdim=True)
            a = b
        yield num / den


def layer_stats(k: torch.Tensor, v: torch.Tensor, T: int, q_prompt: torch.Tensor, q_dec: torch.Tensor,
                args, cfg: ProfileConfig) -> LayerStats:
    """k, v (B, H_kv, T + n, D): a T-token prompt and n decoded tokens; q_prompt (B, H, w, D) the
    prompt's last queries, q_dec (B, H, n, D) the decode queries."""
    B, H_kv, _, D = k.shape
    n = q_dec.shape[2]
    dec = _causal_probs(q_dec, k)  # (B, H_kv, n_rep, n, T + n)
    vf = v.float()[:, :, None]  # (B, H_kv, 1, T + n, D)
    exact = _attend(dec, v)  # (B, H_kv, n_rep, n, D)

    top5 = max(1, math.ceil(0.05 * T))
    dense = (1 - _causal_probs(q_prompt, k[:, :, :T]).topk(top5, dim=-1).values.sum(-1)).mean().item()

    # BudgetedEvictKV: the window and the decoded tokens, plus the best candidates before the
    # window by the prompt's pooled scores. At a budget of k = round(f * T) prompt tokens it keeps
    # the W window tokens and the best k - W candidates, clamped to [0, T - W]. E.g. T = 1000,
    # W = 32, f = 0.25: k = 250, the window + 218 candidates.
    W = min(cfg.evict["window"], T)
    mass = window_scores(k[:, :, :T], q_prompt[:, :, -cfg.evict["window"]:], cfg.evict["pool"])  # (B, H_kv, T)
    order = mass[:, :, :T - W].argsort(dim=-1, descending=True)  # (B, H_kv, T - W)
    cand = dec[..., :T - W].gather(-1, order[:, :, None, None].expand(dec[..., :T - W].shape))
    cand_v = vf[:, :, :, :T - W].gather(3, order[:, :, None, :, None].expand(-1, -1, -1, -1, D))
    cuts = [min(T - W, max(0, round(f * T) - W)) for f in FRACTIONS]
    always = dec[..., T - W:]  # the window and the decoded tokens
    kept = always.sum(-1, keepdim=True)  # (B, H_kv, n_rep, n, 1)
    got = torch.cat([torch.zeros_like(kept), cand.cumsum(-1)], -1)  # mass on the best j candidates
    evict = [(kept[..., 0] + got[..., j]).mean().item() for j in cuts]
    evict_err = [_rel_err(out, exact) for out in _outputs_in_order(
        torch.matmul(always, vf[..., T - W:, :]), kept, cand, cand_v, cuts)]

    # OffloadKV: sink + recent + decoded, and per decode query the top chunks of the middle by the
    # sketch's approximate scores (one ranking per KV head and query: a loop over the n queries)
    sink, recent, c = cfg.offload["sink"], cfg.offload["recent"], cfg.offload["chunk"]
    S, M, R, _ = OffloadKV.layout(T, 0, sink, recent, c)  # budget 0: the middle in whole chunks
    tops = []  # middle tokens fetched per fraction; None: nothing offloaded (error 0), -1: below sink + recent
    for f in FRACTIONS:
        k_f = round(f * T)
        top = OffloadKV.layout(T, k_f, sink, recent, c)[3]
        tops.append(None if M <= 0 or top >= M else (top if k_f >= sink + recent else -1))
    err = torch.zeros(len(FRACTIONS))
    if any(t is not None and t >= 0 for t in tops):
        mid_k = k[:, :, S:S + M].float()
        channels = OffloadKV.sketch_channels(args, cfg.offload["channels"])
        chan = rank_channels(mid_k, q_prompt[:, :, -OffloadKV.q_window:], channels)  # (B, H_kv, C)
        sketch = make_sketch(mid_k, chan, c)  # N = M // c chunks
        qg = q_dec.reshape(B, H_kv, -1, D)  # (B, H_kv, n_rep * n, D), rows (head, query)
        qc = qg.gather(-1, chan[:, :, None, :].expand(-1, -1, qg.shape[2], -1))
        approx = sketch_scores(qc, sketch).view(B, H_kv, -1, n, M // c).amax(dim=2)  # (B, H_kv, n, N)
        fixed = torch.cat([torch.arange(S), torch.arange(S + M, T + n)]).to(k.device)
        # Fetched rows come back from the host store: with 8-bit codes, attention reads those
        # (the selection does not change: the sketch is made from the exact keys)
        dec_h, vf_h = dec, vf  # (B, H_kv, n_rep, n, T + n), (B, H_kv, 1, T + n, D)
        if cfg.offload.get("host", OffloadKV.defaults()["host"]) == "8bit":
            dec_h, vf_h = _causal_probs(q_dec, _host_stored(k, S, M)), _host_stored(v, S, M)[:, :, None]
        valid = [j for j, t in enumerate(tops) if t is not None and t >= 0]
        for i in range(n):
            o = approx[:, :, i].argsort(dim=-1, descending=True)  # (B, H_kv, N) chunks, best first
            p_mid = dec_h[..., i:i + 1, S:S + M].unflatten(-1, (M // c, c))  # (B, H_kv, n_rep, 1, N, c)
            p_mid = p_mid.gather(-2, o[:, :, None, None, :, None].expand(p_mid.shape)).flatten(-2)
            v_mid = vf_h[:, :, :, S:S + M].unflatten(3, (M // c, c))  # (B, H_kv, 1, N, c, D)
            v_mid = v_mid.gather(3, o[:, :, None, :, None, None].expand(v_mid.shape)).flatten(3, 4)
            p_fix = dec_h[..., i:i + 1, fixed]
            outs = _outputs_in_order(torch.matmul(p_fix, vf_h[..., fixed, :]), p_fix.sum(-1, keepdim=True),
                                     p_mid, v_mid, [tops[j] for j in valid])
            for j, out in zip(valid, outs):
                err[j] += _rel_err(out, exact[..., i:i + 1, :]) / n
    offload_err = [0.0 if t is None else 1.0 if t < 0 else err[j].item() for j, t in enumerate(tops)]

    # QuantKV over the prompt (decoded tokens stay in its full-precision residual here)
    quant_err = {}
    for bits in QUANT_BITS:
        qkv = QuantKV(args, 0, T, k.device, k.dtype, bits=bits, **cfg.quant)
        qkv.prefill(k[:, :, :T], v[:, :, :T], q_prompt[:, :, -qkv.q_window:] if qkv.q_window else None)
        kh, vh = qkv.dequantized()
        kh, vh = torch.cat([kh, k[:, :, T:]], 2), torch.cat([vh, v[:, :, T:]], 2)
        quant_err[bits] = _rel_err(_attend(_causal_probs(q_dec, kh), vh), exact)
    return LayerStats(dense, evict, evict_err, offload_err, quant_err)


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
        # a copy: q_window may view the last prefill chunk's queries, which it would keep alive (16 MiB
        # a layer for Llama-3.1-8B at 2048-token chunks)
        self.prompt_len, self.q_prompt = k.shape[2], None if q_window is None else q_window.clone()

    def attend(self, q, k_new, v_new, pos):
        self.q_dec.append(q)
        return super().attend(q, k_new, v_new, pos)

    def stats(self) -> LayerStats:
        return layer_stats(self.k[:, :, :self.length], self.v[:, :, :self.length], self.prompt_len,
                           self.q_prompt, torch.cat(self.q_dec, 2), self.args, self.cfg)


CAL = 6  # the FRACTIONS index (6/64 = 9.4% of the prompt) evict and offload are calibrated at, or above


def calibration_specs(T: int, cfg: ProfileConfig) -> dict[str, tuple[dict | None, int | None]]:
    """The whole-model runs calibrate() makes: kind -> (one spec for every layer, the FRACTIONS index
    of its budget), at the first index from CAL whose budget the policy accepts; (None, None) for a
    kind this prompt is too short to run (then the planner has no option of that kind either)."""
    out = {}
    valid = {"evict": lambda k: k >= cfg.evict["window"],
             "offload": lambda k: k > cfg.offload["sink"] + cfg.offload["recent"]}
    for kind in ("evict", "offload"):
        if kind in cfg.calibrate:
            i = next((i for i in range(CAL, len(FRACTIONS) - 1) if valid[kind](round(FRACTIONS[i] * T))), None)
            params = cfg.evict if kind == "evict" else cfg.offload
            out[kind] = (None, None) if i is None else \
                ({"policy": kind, "budget": round(FRACTIONS[i] * T), **params}, i)
    if "quant" in cfg.calibrate:
        out.update({f"quant{b}": ({"policy": "quant", "bits": b, **cfg.quant}, None) for b in QUANT_BITS})
    return out


@torch.inference_mode()
def profile_prompt(model, ids: list[int], cfg: ProfileConfig | None = None, progress=None) -> list[LayerStats]:
    """Prefill `ids` under ProfileKV, decode cfg.probe greedy tokens, return per-layer statistics
    with the calibration of the kinds in cfg.calibrate (engine/calibrate.py), from the same probe."""
    cfg = cfg or ProfileConfig()
    device = model.head.device
    policies = [ProfileKV(model.args, i, len(ids) + cfg.probe, device, model.head.dtype, cfg)
                for i in range(model.args.n_layers)]
    logits = model.prefill(torch.tensor([ids], device=device), policies, progress=progress)
    decoder = Decoder(model, policies)  # eager: ProfileKV is not graphable
    tokens, outs = [], []
    for i in range(cfg.probe):
        tokens.append(logits.argmax(-1))
        logits = decoder.step(tokens[-1], len(ids) + i)
        outs.append(logits.clone())
    stats = [p.stats() for p in policies]
    runs, harm = {}, {}  # kind -> (spec, each layer's error under it); None: prompt too short for it
    for kind, (spec, at) in calibration_specs(len(ids), cfg).items():
        if spec is None:
            harm[kind] = None
        else:
            runs[kind] = (spec, [s.quant_err[spec["bits"]] if at is None else getattr(s, kind + "_err")[at]
                                 for s in stats])
    harm.update(calibrate(model, [(p.k, p.v, p.q_prompt) for p in policies], len(ids), tokens, outs, runs))
    for s in stats:
        s.harm = harm
    return stats
