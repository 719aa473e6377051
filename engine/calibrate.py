"""What a unit of attention-output error costs at the model's output, per kind of KV policy: the
calibration that lets the planner (engine/planner.py) compare eviction, offload and quantization.

The profile (engine/profile.py) prices every option of a layer by the relative error it would make
in that layer's attention output. That currency alone misleads: the same error harms the output
very differently by kind. Measured on the default model (4k tokens of GPL-3, every layer on one
option; KL over 256 teacher-forced tokens / the per-layer errors summed over the 30 layers):
    evict 10%    0.106 / 3.48  = 0.031 per unit
    offload 10%  0.040 / 2.69  = 0.015
    2-bit        0.112 / 3.32  = 0.034
    1-bit        0.396 / 3.52  = 0.113
1 bit costs ~4x what eviction does per unit of error, offload half: quantization noise moves every
output off the values the model has seen, eviction moves it towards an average of real ones.
Priced alike, the planner filled a 10% plan with 1-bit layers (KL 0.354, vs 0.185 without quant).
Within a plan the costs add up nearly linearly (a plan's quant layers alone: KL 0.154, its evict
layers alone 0.141, both 0.282), so each kind gets one number: its KL per unit of summed error,
measured on the profile's own probe (16 greedy tokens), by running the probe again with every layer
on that kind (on a CPU all kinds as one batch, so the weights are read once per step).

The planner (harm_weights) uses evict and offload together as the reference, weight 1 each: both
keep real tokens, and their ratio is not stable from one probe (offload per eviction 0.77 on GPL-3,
2.9 on profile_layers.py's haystacks; weighted by it, suite plans flipped between all-evict and
all-offload from prompt to prompt). The bit widths are stable (1 bit 14x / 26x the reference on
those, 2 bits 4.2x / 6.5x, 4 bits 0.5x / 0.3x), and only they are weighted.
"""
from __future__ import annotations

import torch

from engine.graphs import Decoder
from engine.kv import build_policies


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in nats, from logits (N, V)."""
    logp, logq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _kl_of_runs(model, specs: list[dict], prompt_kv: list[tuple], T: int, tokens: list[torch.Tensor],
                logits: list[torch.Tensor]) -> list[float]:
    """Mean KL over the probe for each spec (every layer on it), all specs stepped as one batch."""
    device, dtype = prompt_kv[0][0].device, model.head.dtype
    seqs = []
    for spec in specs:
        pols = build_policies(model.args, spec, T + len(tokens), device, dtype)
        for p, (k, v, q_window) in zip(pols, prompt_kv):
            p.prefill(k[:, :, :T], v[:, :, :T], q_window[:, :, -p.q_window:] if p.q_window else None)
        seqs.append(pols)
    decoder = Decoder(model, seqs, cuda_graphs=False)  # one sequence per spec
    n = len(seqs)
    kl = torch.zeros(n, device=logits[0].device)
    for i, (tok, ref) in enumerate(zip(tokens, logits)):
        kl += kl_divergence(ref.expand(n, -1), decoder.step(tok.expand(n), [T + i] * n))
    return (kl / len(tokens)).tolist()


@torch.inference_mode()
def calibrate(model, prompt_kv: list[tuple], T: int, tokens: list[torch.Tensor], logits: list[torch.Tensor],
              runs: dict[str, tuple[dict, list[float]]], batch: bool | None = None) -> dict[str, float | None]:
    """-> {kind: KL(FullKV || every layer on `spec`) / sum of the layers' errors}, None for a kind
    whose errors are rounding noise.

    prompt_kv: per layer (k, v, q_window) with k, v (B, H_kv, >= T, D) holding the T-token prompt
    and q_window (B, H, w, D) its last queries (what the policies choose by); tokens: the probe's
    greedy tokens, fed at positions T, T + 1, ...; logits: FullKV's logits after each (1, vocab);
    runs: kind -> (one spec for every layer, each layer's error under it, as the profile measured).
    batch: step every kind as one batch (default on a CPU, where reading the weights once per step
    is what costs) or one kind after the other (default on a GPU, where the kinds' caches beside the
    profile's FullKV are what costs: at 128k the 4-, 2- and 1-bit caches alone are ~0.55 of it)."""
    if not runs:
        return {}
    device = prompt_kv[0][0].device
    batch = device.type == "cpu" if batch is None else batch
    specs = [spec for spec, _ in runs.values()]
    if batch:
        kls = _kl_of_runs(model, specs, prompt_kv, T, tokens, logits)
    else:
        kls = [_kl_of_runs(model, [spec], prompt_kv, T, tokens, logits)[0] for spec in specs]
    # A kind whose layers hardly err (QuantKV on a prompt shorter than its full-precision window keeps
    # every token exact) measures rounding noise in both its KL (even below 0) and its errors: their
    # ratio means nothing, and once priced QuantKV above FullKV. Such a kind stays uncalibrated (None).
    return {kind: max(kl, 0.0) / sum(errs) if sum(errs) > 1e-4 * len(errs) else None
            for (kind, (_, errs)), kl in zip(runs.items(), kls)}
