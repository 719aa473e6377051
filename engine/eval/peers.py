"""bench.py's peers, run on the same weights as this engine (engine/eval/hf_view.py: no copy):
Hugging Face transformers with its default DynamicCache and its QuantizedCache (quanto, 4-bit),
and NVIDIA kvpress presses (SnapKV, PyramidKV, AdaKV, StreamingLLM) compressing that DynamicCache
at prefill to the same kept-token fraction as our policies (compression_ratio = 1 - fraction).

They are measured the way our policies are (engine/eval/cells.py): prefill, greedy decode steps timed
one by one (the token read back on the host each step), KV bytes actually held by the cache, peak
memory, and quality against *our* FullKV's logits on the same prompt. A peer that is not installed
is a row saying so; nothing is estimated in its place.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import time

import torch

from engine.eval.cells import latency_fields, passkey_fields, peak_memory
from engine.eval.haystack import make_haystack
from engine.eval.quality import compare
from engine.runner import sync

PRESSES = {"snapkv": "SnapKVPress", "pyramidkv": "PyramidKVPress", "adakv": "AdaKVPress",
           "streamingllm": "StreamingLLMPress", "tova": "TOVAPress", "knorm": "KnormPress"}
# kvpress's DecodingPress is left out: it compresses only while decoding, so on these prompt-heavy
# measurements (at most 64 new tokens) it would hold the whole prompt, i.e. be FullKV.
PEER_GROUPS = {"transformers": ["hf-dynamic", "hf-quanto4", "hf-quanto2"], "kvpress": [f"kvpress-{p}" for p in PRESSES]}


def expand_peers(names: list[str]) -> list[str]:
    """'transformers', 'kvpress', 'all', 'none' or single peers (hf-dynamic, kvpress-snapkv, ...)."""
    out: list[str] = []
    for name in names:
        if name == "none":
            continue
        group = [p for g in PEER_GROUPS.values() for p in g] if name == "all" else PEER_GROUPS.get(name, [name])
        for p in group:
            if p not in PEER_GROUPS["transformers"] + PEER_GROUPS["kvpress"]:
                raise ValueError(f"unknown peer {p!r}; choose from transformers, kvpress, all, none, "
                                 + ", ".join(PEER_GROUPS["transformers"] + PEER_GROUPS["kvpress"]))
            if p not in out:
                out.append(p)
    return out


def skip_reason(peer: str) -> str | None:
    """Why `peer` cannot run in this environment, or None."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers not installed"
    if peer.startswith("hf-quanto") and importlib.util.find_spec("optimum") is None:
        return "optimum-quanto not installed (make peers, then run with .venv-peers/bin/python)"
    if peer.startswith("kvpress-"):
        if importlib.util.find_spec("kvpress") is None:
            return "kvpress not installed (make peers, then run with .venv-peers/bin/python)"
        try:
            import kvpress  # noqa: F401  (it patches transformers' attention on import)
        except Exception as e:  # noqa: BLE001 -- e.g. an incompatible transformers version
            return f"kvpress does not import here: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


def make_press(peer: str, fraction: float):
    if not peer.startswith("kvpress-"):
        return None
    import kvpress
    ratio = 1.0 - fraction  # kvpress's compression_ratio is the share of tokens *removed*
    name = peer.removeprefix("kvpress-")
    if name == "adakv":  # AdaKV redistributes a scorer's budget across heads; SnapKV scores, as in kvpress's docs
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    return getattr(kvpress, PRESSES[name])(compression_ratio=ratio)


def make_cache(peer: str, hf):
    import transformers
    if peer.startswith("hf-quanto"):  # transformers >= 4.56 API; residual (recent) 128 tokens unquantized
        return transformers.QuantizedCache(backend="quanto", config=hf.config, nbits=int(peer[-1]))
    return transformers.DynamicCache()


def tensor_bytes(t) -> int:
    """Bytes of a tensor, looking inside wrapper subclasses (quanto's packed QTensors)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def cache_bytes(cache) -> int:
    """Bytes held by a transformers Cache: every tensor reachable from its layers' attributes."""
    seen: set[int] = set()

    def walk(x) -> int:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return 0
            seen.add(id(x))
            return tensor_bytes(x)
        if isinstance(x, (list, tuple)):
            return sum(walk(y) for y in x)
        if isinstance(x, dict):
            return sum(walk(y) for y in x.values())
        return 0

    return sum(walk(v) for layer in cache.layers for v in vars(layer).values())


def with_cache(hf, cache) -> dict:
    """The keyword argument that hands `cache` to a transformers model's forward: `cache` in recent
    releases (5.24 has it), `past_key_values` before them (kvpress pins one of those); the old name
    is deprecated and goes in 5.40."""
    return {"cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values": cache}


@torch.inference_mode()
def prefill(hf, ids: list[int], cache, press) -> torch.Tensor:
    """-> last-position logits (1, vocab); only that position goes through the head (128k prompts)."""
    x = torch.tensor([ids], device=hf.device)
    with press(hf) if press is not None else contextlib.nullcontext():
        return hf(input_ids=x, **with_cache(hf, cache), use_cache=True, logits_to_keep=1).logits[:, -1]


@torch.inference_mode()
def forward(hf, tokens: list[int] | torch.Tensor, cache, pos: int) -> torch.Tensor:
    """tokens at positions pos, pos+1, ... after the cache -> logits (n, vocab). Positions are given
    explicitly because a pressed cache holds fewer tokens than the text has (as kvpress's pipeline)."""
    x = torch.as_tensor(tokens, device=hf.device).reshape(1, -1)
    positions = torch.arange(pos, pos + x.shape[1], device=hf.device)[None]
    return hf(input_ids=x, **with_cache(hf, cache), position_ids=positions, use_cache=True).logits[0]


def latency_cell(hf, peer: str, ids: list[int], fraction: float, cfg) -> dict:
    device = hf.device
    cache, press = make_cache(peer, hf), make_press(peer, fraction)
    sync(device)
    t = time.perf_counter()
    logits = prefill(hf, ids, cache, press)
    sync(device)
    prefill_s = time.perf_counter() - t
    token, times = logits.argmax(-1), []
    for i in range(cfg.new_tokens - 1):
        t = time.perf_counter()
        token = forward(hf, token, cache, len(ids) + i)[-1:].argmax(-1)
        token.item()  # waits for the device, as our engine's step does
        times.append(time.perf_counter() - t)
    elem = next(hf.parameters()).element_size()
    full = 2 * hf.config.num_hidden_layers * hf.config.num_key_value_heads * hf.config.head_dim * elem
    out = latency_fields(prefill_s, times[cfg.warmup:], {"device": cache_bytes(cache), "host": 0},
                         full * (len(ids) + cfg.new_tokens), peak_memory(device))
    if peer == "kvpress-adakv":
        out["note"] = "kvpress's AdaKV masks evicted keys instead of freeing them: bytes as held"
    return out


@torch.inference_mode()
def greedy(hf, peer: str, prompt: list[int], fraction: float, max_new_tokens: int, eos_ids) -> tuple[list[int], int]:
    """Greedy tokens after `prompt` under `peer` at `fraction`, as engine/eval/quality.greedy does for
    our policies -> (tokens, bytes the cache holds after the decode: the tokens it decoded are
    counted, as our policies count the room they keep for them)."""
    cache = make_cache(peer, hf)
    ids = [int(prefill(hf, prompt, cache, make_press(peer, fraction)).argmax(-1))]
    while ids[-1] not in eos_ids and len(ids) < max_new_tokens:
        ids.append(int(forward(hf, ids[-1:], cache, len(prompt) + len(ids) - 1)[-1].argmax(-1)))
    return ids, cache_bytes(cache)


@torch.inference_mode()
def teacher_forced(hf, peer: str, prompt: list[int], cont: list[int], fraction: float):
    """-> (logits (len(cont), vocab) predicting each continuation token, the cache). The continuation
    is fed one token per forward call, as our engine and kvpress's own pipeline decode: a press that
    keeps a different number of tokens per layer (PyramidKV once its pyramid is active, e.g. 8k
    tokens at 20%: layer 0 keeps 3170, layer 1 3063) breaks a multi-token forward in transformers,
    whose attention mask is sized by layer 0's cache ("size of tensor a (3126) must match ... (3233)")."""
    cache = make_cache(peer, hf)
    first = prefill(hf, prompt, cache, make_press(peer, fraction))
    steps = [forward(hf, [t], cache, len(prompt) + i) for i, t in enumerate(cont[:-1])]
    return torch.cat([first, *steps]).float(), cache


def quality_cell(hf, peer: str, tok, ref: dict, fraction: float, cfg) -> dict:
    """Teacher-forced KL/top-1/ppl against our FullKV logits (ref) and the same pass-key grid."""
    prompt, cont = ref["prompt"], ref["continuation"]
    logits, _ = teacher_forced(hf, peer, prompt, cont, fraction)
    f = compare(ref["full_logits"], logits, cont)
    del logits
    found, answers = [], []
    for seed in range(cfg.seeds):
        for depth in cfg.depths:
            h = make_haystack(tok, len(prompt), depth=depth, seed=seed)
            answers.append(tok.decode(greedy(hf, peer, h.ids, fraction, 8, tok.eos_ids)[0]))
            found.append(h.found(answers[-1]))
    out = passkey_fields(found, answers)
    out.update(kl=f.kl, top1=f.top1, ppl=f.ppl, ppl_full=f.ppl_full, h2d_bytes_per_token=0.0)
    return out
