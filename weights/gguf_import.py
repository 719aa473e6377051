"""Import a llama.cpp GGUF file (the default model ships as one) into an HF-layout directory.

The file is dequantized once per dtype the model runs in (float32 on CPU, bfloat16 on a GPU) with the
`gguf` package, a tensor at a time, and written as config.json + model.safetensors into the cache
directory; later runs load the cached copy like any HF checkpoint. The import is
atomic: it writes into a temporary directory, syncs it to disk and renames it into place, so a
failure (corrupt file, disk full, Ctrl-C) never leaves a half-written cache entry behind. What other
mishaps leave (a disk that lost the data anyway, an entry copied in by hand and cut short, the
temporary directory of a process that was killed) is repaired on the next open: an entry is checked
before use (config.json parses; model.safetensors is as long as its header says) and imported again
with a one-line note if not, and temporary directories of dead processes are removed.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time

import numpy as np
import torch

from engine.config import ModelArgs
from weights.safetensors_write import SAFETENSORS_DTYPES, write_safetensors

CACHE_VERSION = 1  # bump when the import format changes, so stale cache entries are not reused


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "layerkv")


def _reverse_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each q/k head's rows for its interleaved-pair RoPE; put them
    back in HF's half-split order: (heads, 2, D/2) rows were stored as (heads, D/2, 2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # suffix: "weight"
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    raise ValueError(f"unsupported tensor {gguf_name!r} in GGUF (only plain Llama tensors are imported)")


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_args(reader, name: str) -> ModelArgs:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"not a Llama GGUF: general.architecture={arch!r}")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    dim = int(_field(reader, "llama.embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    # Llama-3.1's rescaling comes as a tensor (llama3_scaling); one named here would be silently lost
    scaling, factor = _field(reader, "llama.rope.scaling.type"), _field(reader, "llama.rope.scaling.factor", 1.0)
    if scaling not in (None, "none") and not (scaling == "linear" and factor == 1.0):  # linear x1: none
        raise ValueError(f"unsupported RoPE scaling {scaling!r} x{factor} in GGUF (only llama3's rope_freqs)")
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelArgs(
        name=name, dim=dim, n_layers=int(_field(reader, "llama.block_count")), n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        vocab_size=int(vocab), ffn_dim=int(_field(reader, "llama.feed_forward_length")),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_seq_len=int(_field(reader, "llama.context_length", 4096)),
        tie_embeddings="output.weight" not in tensor_names,
        head_dim=int(_field(reader, "llama.rope.dimension_count", dim // n_heads)))


def llama3_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """Llama-3.1's RoPE rescaling ("rope_type": "llama3") from the tensor llama.cpp stores it as.

    llama.cpp's converter does not keep the four numbers of the rescaling (factor, low and high
    frequency factors, original context) but a tensor `rope_freqs`: the divisor of each frequency,
    1 for short wavelengths, `factor` for long ones, 1 / ((1 - s) / factor + s) in between (engine/
    rope.py has the formula). There s = old / (high - low) / wavelength - low / (high - low) is a line
    in 1 / wavelength, so two blended frequencies fix it, and with low = 1 (Llama's convention) old
    and high follow: Llama-3.1-8B's divisors give factor 8, high 4, old 8192. The numbers found
    must reproduce every divisor, else the file is refused; all divisors 1: no rescaling (None)."""
    from engine.rope import inv_frequencies
    f = factors.astype(np.float64)
    if f.shape != (head_dim // 2,) or not np.all(np.isfinite(f)) or f.min() <= 0:
        raise ValueError(f"rope_freqs has {f.shape} entries for head_dim {head_dim}, or non-positive ones")
    if np.allclose(f, 1.0):
        return None
    factor = float(f.max())
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    candidates = [dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)]
    mid = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))  # blended frequencies
    if mid.sum() >= 2:
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(inv[mid] / (2 * np.pi), s, 1)  # s = a / wavelength + b
        if b < 0:  # low = 1 means -b = 1 / (high - low)
            candidates.insert(0, dict(low_freq_factor=1.0, high_freq_factor=round(float((b - 1) / b), 4),
                                      original_max_position_embeddings=int(round(-a / b))))
    for c in candidates:
        scaling = {"rope_type": "llama3", "factor": factor, **c}
        if np.allclose(inv / f, inv_frequencies(head_dim, theta, scaling).double().numpy(), rtol=1e-4, atol=0):
            return scaling
    raise ValueError("rope_freqs is not a Llama-3 (llama3) RoPE rescaling this importer can reproduce")


def _open(gguf_path: str, name: str):
    """-> (the GGUF reader, ModelArgs with the RoPE rescaling of a rope_freqs tensor). The reader
    maps the file: nothing is dequantized here."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # the reader raises assorted errors on a damaged file
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    try:
        args = gguf_args(reader, name)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{gguf_path}: GGUF metadata incomplete ({e})") from None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # not a weight: Llama-3.1's RoPE rescaling, into config.json
            try:
                args.rope_scaling = llama3_scaling(np.asarray(t.data), args.head_dim, args.rope_theta)
            except ValueError as e:
                raise ValueError(f"{gguf_path}: {e}") from None
    return reader, args


def _write_import(gguf_path: str, out_dir: str, name: str, dtype: torch.dtype) -> None:
    from gguf.quants import dequantize

    reader, args = _open(gguf_path, name)
    weights = []  # (HF name, shape, the GGUF tensor): every name checked before the long part
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # in config.json (_open)
            continue
        weights.append((_hf_name(t.name), tuple(int(n) for n in reversed(t.shape)), t))  # GGUF lists dims fastest first

    def dequantized(t) -> torch.Tensor:
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32)
        except Exception as e:
            raise ValueError(f"{gguf_path}: cannot dequantize {t.name} ({e})") from None
        if t.name.endswith("attn_q.weight"):
            w = _reverse_permute(w, args.n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = _reverse_permute(w, args.n_kv_heads)
        return torch.from_numpy(np.ascontiguousarray(w))

    write_safetensors(os.path.join(out_dir, "model.safetensors"),
                      [(name, shape, lambda t=t: dequantized(t)) for name, shape, t in weights], dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**args.to_hf_config(), "imported_from": os.path.abspath(gguf_path)}, f, indent=1)
    _sync(out_dir)


def _sync(directory: str) -> None:
    """fsync every file of `directory` and the directory itself: the rename that publishes it must
    not reach the disk before the data does."""
    for path in [os.path.join(directory, name) for name in os.listdir(directory)] + [directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def entry_problem(entry: str) -> str | None:
    """Why a cache entry cannot be used, or None. A safetensors file is an 8-byte little-endian
    header length n, an n-byte JSON header giving each tensor's [begin, end) in the data after it,
    then the data: the file must be exactly 8 + n + max(end) bytes long."""
    try:
        with open(os.path.join(entry, "config.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"config.json unreadable ({type(e).__name__})"
    path = os.path.join(entry, "model.safetensors")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except (OSError, struct.error, ValueError) as e:
        return f"model.safetensors unreadable ({type(e).__name__})"
    if not isinstance(header, dict):
        return "model.safetensors has no valid header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"model.safetensors is {size} bytes, its header says {8 + n + end}"
    return None


def _remove_stale_imports(root: str, log) -> None:
    """Delete `.importing-<pid>-*` directories whose process is gone (killed mid-import), and
    unnamed ones older than a day."""
    for name in os.listdir(root):
        if not name.startswith(".importing-"):
            continue
        path = os.path.join(root, name)
        pid = name.split("-")[1]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                continue  # that import is still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, someone else's
        elif time.time() - os.path.getmtime(path) < 86400:
            continue
        log(f"removing {path}, left by an import that did not finish")
        shutil.rmtree(path, ignore_errors=True)


def _entries(gguf_path: str) -> tuple[str, dict[torch.dtype, str]]:
    """(the file's name stem, its cache entry's directory per dtype). An entry is keyed by the
    file's size and modification time, so an edited file is imported afresh; float32 entries keep
    the key they had before entries had a dtype."""
    if not os.path.isfile(gguf_path):
        raise ValueError(f"{gguf_path}: no such GGUF file")
    st = os.stat(gguf_path)
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    key = os.path.join(cache_root(), "gguf", f"{stem}-{st.st_size:x}-{int(st.st_mtime):x}-v{CACHE_VERSION}")
    return stem, {d: key + ("" if d == torch.float32 else "-" + str(d).removeprefix("torch."))
                  for d in SAFETENSORS_DTYPES}


def gguf_config(gguf_path: str, name: str) -> ModelArgs:
    """The ModelArgs an import of `gguf_path` gives, without importing (dequantizing) it: from a
    cache entry of any dtype whose config.json reads as one, else from the file's metadata."""
    for entry in _entries(gguf_path)[1].values():
        try:
            with open(os.path.join(entry, "config.json")) as f:
                return ModelArgs.from_hf_config(json.load(f), name=name)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):  # none, or damaged: the next
            continue
    return _open(gguf_path, name)[1]


def import_gguf(gguf_path: str, log=print, dtype: torch.dtype = torch.float32) -> str:
    """Return the cache directory holding the dequantized HF-layout copy of `gguf_path` in `dtype`,
    importing it first if needed. The copy is in the dtype the model will run in: rounding to it
    once here gives the weights the loader would make from float32, and for an 8B model half the
    disk (16 GB in bfloat16) and half the bytes to read on every load."""
    stem, entries = _entries(gguf_path)
    if dtype not in entries:  # e.g. float64, for a direct caller: loaded from float32
        dtype = torch.float32
    final = entries[dtype]
    root = os.path.dirname(final)
    if os.path.isdir(final):
        problem = entry_problem(final)
        if problem is None:
            return final
        log(f"cache entry {final} is damaged ({problem}); importing again")
        shutil.rmtree(final, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    _remove_stale_imports(root, log)
    tmp = tempfile.mkdtemp(prefix=f".importing-{os.getpid()}-", dir=root)
    try:
        log(f"importing {os.path.basename(gguf_path)} (dequantizing once, cached in {final})")
        _write_import(gguf_path, tmp, stem, dtype)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same import first: use theirs
            if entry_problem(final) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
