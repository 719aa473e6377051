"""Load a Hugging Face-layout checkpoint: config.json + model.safetensors, or sharded
model-XXXXX-of-YYYYY.safetensors with model.safetensors.index.json.

Tensors are read lazily one at a time (safetensors memory-maps the files), converted to the target
dtype and copied into the model's fused matrices, so peak memory stays near one model's size.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack

import torch
from safetensors import SafetensorError, safe_open

from engine.cli import fmt_bytes, free_memory
from engine.config import ModelArgs
from engine.model import Llama


def check_fits(args: ModelArgs, device: torch.device | str, dtype: torch.dtype, what: str) -> None:
    """Refuse, in one line, weights that cannot fit on the device, before allocating any of them
    (the allocator would fail half way with its own message, or the kernel kill the process)."""
    device = torch.device(device)
    need = args.n_params() * torch.empty((), dtype=dtype).element_size()
    free = free_memory(device)
    if need > free:
        raise ValueError(f"{what} needs {fmt_bytes(need)} for its weights as {str(dtype).removeprefix('torch.')}; "
                         f"{device} has {fmt_bytes(free)} free")


def read_config(model_dir: str) -> ModelArgs:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return ModelArgs.from_hf_config(cfg, name=os.path.basename(os.path.normpath(model_dir)))


def weight_files(model_dir: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file that holds it."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: malformed index ({e})") from None
        return {name: os.path.join(model_dir, fn) for name, fn in weight_map.items()}
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise ValueError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    files = {}
    try:
        with safe_open(single, framework="pt") as f:
            files = {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{single}: not a readable safetensors file ({e})") from None
    return files


def load_hf(model_dir: str, device: torch.device | str, dtype: torch.dtype) -> tuple[ModelArgs, Llama]:
    """Build the model from an HF directory; every problem with the files is a one-line ValueError."""
    args = read_config(model_dir)
    check_fits(args, device, dtype, model_dir)
    where = weight_files(model_dir)
    with ExitStack() as stack:
        handles: dict[str, object] = {}

        def get(name: str) -> torch.Tensor:
            if name not in where:
                raise ValueError(f"{model_dir}: checkpoint lacks tensor {name!r}")
            path = where[name]
            try:
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(path, framework="pt"))
                return handles[path].get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path}: cannot read tensor {name!r} ({e})") from None

        try:
            model = Llama.from_hf_state_dict(args, get, device, dtype)
        except RuntimeError as e:  # shape mismatch between config.json and the tensors
            raise ValueError(f"{model_dir}: weights do not match config.json ({str(e).splitlines()[0]})") from None
    return args, model
