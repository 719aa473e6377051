"""The profile's record of one layer (LayerStats), as the planner reads it: averaged over prompts
and saved as JSON (profile_layers.py --stats). engine/profile.py measures it; its module docstring
says what each field means.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

FRACTIONS = [i / 64 for i in range(65)]  # budgets as fractions of the prompt, 0 .. 1
QUANT_BITS = (1, 2, 4)


@dataclass
class LayerStats:
    dense: float
    evict: list[float]
    evict_err: list[float]
    offload_err: list[float]
    quant_err: dict[int, float]
    harm: dict[str, float | None] | None = None  # KL per unit of error, per kind (calibrate()), same in every layer


def average(profiles: list[list[LayerStats]]) -> list[LayerStats]:
    """Mean over several prompts' profiles, layer by layer."""
    n = len(profiles)
    out = []
    for layer in zip(*profiles):
        out.append(LayerStats(
            dense=sum(s.dense for s in layer) / n,
            evict=[sum(vals) / n for vals in zip(*(s.evict for s in layer))],
            evict_err=[sum(vals) / n for vals in zip(*(s.evict_err for s in layer))],
            offload_err=[sum(vals) / n for vals in zip(*(s.offload_err for s in layer))],
            quant_err={b: sum(s.quant_err[b] for s in layer) / n for b in layer[0].quant_err},
            harm=_mean_harm([s.harm for s in layer])))
    return out


def _mean_harm(harms: list[dict | None]) -> dict[str, float | None] | None:
    """Each kind's calibration averaged over the profiles that measured it (None: none did; the
    whole dict None when a profile has no calibration at all)."""
    if not harms or any(h is None for h in harms):
        return None
    out = {}
    for kind in sorted(set().union(*harms)):
        vals = [h[kind] for h in harms if h.get(kind) is not None]
        out[kind] = sum(vals) / len(vals) if vals else None
    return out


def stats_to_json(stats: list[LayerStats]) -> list[dict]:
    return [asdict(s) for s in stats]


def stats_from_json(rows: list[dict]) -> list[LayerStats]:
    """Also reads statistics saved before errors priced eviction and offload (kept mass then): their
    errors are 1 - mass, as they were priced, and they carry no calibration."""
    return [LayerStats(r["dense"], r["evict"], r.get("evict_err", [1 - x for x in r["evict"]]),
                       r.get("offload_err", [1 - x for x in r.get("offload", [])]),
                       {int(b): e for b, e in r["quant_err"].items()}, r.get("harm")) for r in rows]
