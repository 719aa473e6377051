"""Kernels: each family in one file with a Triton kernel, a plain-torch reference of the same
signature beside it, and a dispatch between the two.

Dispatch rule: Triton for CUDA tensors, the torch reference elsewhere. The environment variable
LAYERKV_KERNELS=triton|torch forces one side for debugging (read at each call, so tests can set it;
"triton" on CPU tensors needs TRITON_INTERPRET=1, which is how the kernel tests run without a GPU).
"""
from __future__ import annotations

import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("LAYERKV_KERNELS", "auto").lower()
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"LAYERKV_KERNELS must be auto, triton or torch, not {mode!r}")
    if mode == "auto":
        return t.is_cuda
    return mode == "triton"
