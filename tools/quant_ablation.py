"""Screen QuantKV's levers on real activations, one at a time: rotation, group size, sink tokens, heavy
hitters held in full precision, clipping and keys quantized before RoPE (KVQuant), at 1, 2 and 4 bits.

For each pass-key prompt the model is prefilled and decodes `--probe` greedy tokens with a full
cache (engine/profile.py's ProfileKV records the decode queries). Then, per layer and per setting,
the prompt's K/V go through a real QuantKV and come back dequantized, and the decode queries attend
over them; the number reported is the relative error of the attention output against the exact one
(the profile's quant_err), the mean over layers, heads and queries, and its worst layer. Cheap (no
decode per setting), so it ranks the levers before bench.py's end-to-end KL and pass-key run.

"ktok" simulates keys quantized per token (groups along head_dim) instead of per channel.
"kbits=b" simulates keys at b bits (0: exact) with values at the row's bits, to split the error
between keys and values. "pre-RoPE" is simulated: keys are un-rotated to their pre-RoPE values (RoPE is a rotation, so this
is exact), quantized, dequantized, and RoPE applied again. QuantKV itself stores post-RoPE keys;
this setting only tells whether building the pre-RoPE path into the kernels would pay.

    python tools/quant_ablation.py --ctx 2048 --bits 2 --settings base,rotate=kv,rotate=kv+sink=1
    python tools/quant_ablation.py --text --ctx 4096 --probe 64 --settings heavy=0,base,heavy=0.02
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.graphs import Decoder  # noqa: E402
from engine.kv.quant import QuantKV  # noqa: E402
from engine.profile import ProfileConfig, ProfileKV, _attend, _causal_probs  # noqa: E402
from engine.rope import rope_cos_sin  # noqa: E402
from engine.eval.cells import text_ids  # noqa: E402
from engine.eval.haystack import make_haystack  # noqa: E402
from kernels.rotary import apply_rope  # noqa: E402
from kernels.pack import quantize_pack, unpack_dequant  # noqa: E402
from weights.load import DEFAULT_MODEL, load_model  # noqa: E402

DEFAULT_SETTINGS = ("base,group=32,rotate=v,rotate=kv,sink=1,prerope,rotate=kv+sink=1,rotate=kv+sink=4,"
                    "rotate=kv+sink=1+group=32,prerope+rotate=v+sink=1,prerope+rotate=v+sink=1+group=32")


def parse_setting(text: str) -> dict:
    """'rotate=kv+sink=1+prerope' -> {'rotate': 'kv', 'sink': 1, 'prerope': True}; 'base' -> {}."""
    out = {}
    for piece in text.split("+"):
        if piece in ("base", ""):
            continue
        if piece in ("prerope", "ktok"):
            out[piece] = True
            continue
        key, _, val = piece.partition("=")
        if key not in ("rotate", "sink", "group", "residual", "kbits", "clip", "heavy", "scales"):
            raise SystemExit(f"error: unknown setting piece {piece!r} in {text!r}")
        out[key] = val if key in ("rotate", "clip", "scales") else float(val) if key == "heavy" else int(val)
    return out


def capture(model, ids: list[int], probe: int, forced: list[int] | None = None) -> list[ProfileKV]:
    """Prefill under ProfileKV and decode `probe` tokens, greedy or the `forced` ones (teacher
    forcing): each layer's K/V, the prompt's last queries and the decode queries."""
    cfg = ProfileConfig(probe=probe)
    pols = [ProfileKV(model.args, i, len(ids) + probe, "cpu", model.head.dtype, cfg)
            for i in range(model.args.n_layers)]
    logits = model.prefill(torch.tensor([ids]), pols)
    dec = Decoder(model, pols)
    for i in range(probe):
        logits = dec.step(torch.tensor([forced[i]]) if forced else logits.argmax(-1), len(ids) + i)
    return pols


def layer_error(p: ProfileKV, args, bits: int, setting: dict, rope) -> float:
    T = p.prompt_len
    k, v = p.k[:, :, :p.length], p.v[:, :, :p.length]
    q = torch.cat(p.q_dec, 2)
    exact = _attend(_causal_probs(q, k), v)
    kq = k[:, :, :T]
    cos, sin = rope
    if setting.get("prerope"):
        kq = apply_rope(kq, cos[:T], -sin[:T])  # RoPE by -angle: the keys before RoPE
    params = {key: val for key, val in setting.items() if key not in ("prerope", "kbits", "ktok")}
    qkv = QuantKV(args, 0, T, "cpu", k.dtype, bits=bits, **params)
    # the prompt's last queries pick the heavy hitters (their scores need post-RoPE keys: none with prerope)
    q_window = None if setting.get("prerope") else p.q_prompt
    qkv.prefill(kq, v[:, :, :T], q_window)
    kh, vh = qkv.dequantized()
    if "kbits" in setting:  # keys at other bits (0: exact), values at `bits`
        kq_only = QuantKV(args, 0, T, "cpu", k.dtype, bits=setting["kbits"] or 4, **params)
        kq_only.prefill(kq, v[:, :, :T], q_window)
        kh = kq_only.dequantized()[0] if setting["kbits"] else kq
    if setting.get("ktok"):  # keys per token (groups along head_dim, as values), rotated as QuantKV does
        G, S, R = qkv.group, min(qkv.sink, T), qkv.residual
        n = max(S, (T - 1) // R * R)
        kr = kq @ qkv.rot if qkv.rotate == "kv" else kq
        deq = unpack_dequant(*quantize_pack(kr[:, :, S:n], bits, G, per_channel=False), bits, G, per_channel=False)
        deq = deq @ qkv.rot.T if qkv.rotate == "kv" else deq
        kh = torch.cat([kq[:, :, :S], deq, kq[:, :, n:]], 2)
    if setting.get("prerope"):
        kh = apply_rope(kh, cos[:T], sin[:T])
    kh, vh = torch.cat([kh, k[:, :, T:]], 2), torch.cat([vh, v[:, :, T:]], 2)
    approx = _attend(_causal_probs(q, kh), vh)
    return ((approx - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-9)).mean().item()


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=2048, help="prompt tokens (default 2048)")
    ap.add_argument("--depths", default="0.3,0.7", help="needle depths, one prompt each (default 0.3,0.7)")
    ap.add_argument("--bits", default="1,2,4", help="bit widths (default 1,2,4)")
    ap.add_argument("--probe", type=int, default=8, help="greedy decode queries per prompt (default 8)")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated settings, pieces joined by +")
    ap.add_argument("--per-layer", action="store_true", help="also print every layer's error")
    ap.add_argument("--text", action="store_true",
                    help="instead of pass-key prompts: --ctx tokens of GPL-3 (bench.py's KL text) and --probe "
                         "teacher-forced continuation tokens after them")
    a = ap.parse_args()
    settings = [(s, parse_setting(s)) for s in a.settings.split(",")]
    bits_list = [int(b) for b in a.bits.split(",")]
    m = load_model(DEFAULT_MODEL, "cpu", torch.float32, log=lambda _: None)
    args = m.args
    rope = rope_cos_sin(m.model.inv_freq, torch.arange(a.ctx), torch.float32)
    errors = {}  # (setting, bits) -> per-layer errors summed over prompts
    depths = [None] if a.text else [float(d) for d in a.depths.split(",")]
    for depth in depths:
        if a.text:
            ids = text_ids(m, a.ctx + a.probe)
            pols = capture(m.model, ids[:a.ctx], a.probe, forced=ids[a.ctx:])
        else:
            pols = capture(m.model, make_haystack(m.tokenizer, a.ctx, depth).ids, a.probe)
        for name, setting in settings:
            for bits in bits_list:
                errs = [layer_error(p, args, bits, setting, rope) for p in pols]
                prev = errors.get((name, bits), [0.0] * len(errs))
                errors[(name, bits)] = [x + e / len(depths) for x, e in zip(prev, errs)]
        print(f"  prompt {'of text' if a.text else f'at depth {depth}'} done", file=sys.stderr, flush=True)
    source = "GPL-3, teacher-forced" if a.text else f"pass-key prompts at depths {a.depths}, greedy"
    print(f"relative attention-output error, {a.ctx} tokens, {source}, {a.probe} decode queries each")
    print(f"{'setting':44s}" + "".join(f"  {b}-bit mean (worst layer)" for b in bits_list))
    for name, _ in settings:
        cells = []
        for b in bits_list:
            e = errors[(name, b)]
            worst = max(range(len(e)), key=e.__getitem__)
            cells.append(f"  {sum(e) / len(e):8.3f} ({e[worst]:.2f} @L{worst}){'':5s}")
        print(f"{name:44s}" + "".join(cells))
        if a.per_layer:
            for b in bits_list:
                print(f"    {b}-bit per layer: " + " ".join(f"{x:.2f}" for x in errors[(name, b)]))


if __name__ == "__main__":
    main()
