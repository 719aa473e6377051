"""A safetensors file written one tensor at a time, for the GGUF import (weights/gguf_import.py).

safetensors.torch.save_file takes every tensor at once, so the import held the whole model
dequantized: 32 GB of float32 for an 8B model. The format needs only the tensors' shapes up front,
so the header can be written first and each tensor's bytes made and appended in turn.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Callable

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]],
                      dtype: torch.dtype) -> None:
    """tensors: (name, shape, make), written in this order as `dtype`; make() is called only when
    its bytes are due, so one made tensor is in memory at a time. The header goes first: an 8-byte
    little-endian length, then JSON giving each tensor's dtype, shape and [begin, end) in the data
    that follows, padded with spaces to a multiple of 8 bytes."""
    elem = torch.empty(0, dtype=dtype).element_size()
    header, at = {}, 0
    for name, shape, _ in tensors:
        size = math.prod(shape) * elem
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, make in tensors:
            t = make().to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: made {tuple(t.shape)}, the header says {tuple(shape)}")
            f.write(t.reshape(-1).view(torch.uint8).numpy())
            del t  # before the next make()
