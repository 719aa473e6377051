"""Kernels: each family in one file with a Triton kernel, a plain-torch reference of the same
signature beside it, and a dispatch between the two.

Dispatch rule: Triton for CUDA tensors, the torch reference elsewhere. The environment variable
LAYERKV_KERNELS=triton|torch forces one side for debugging (read at each call, so tests can set it;
"triton" on CPU tensors needs TRITON_INTERPRET=1, which is how the kernel tests run without a GPU).
"""
from __future__ import annotations

import os

import torch

# The process's first vectorized exp, cos, sin or tanh on the CPU, split across threads, can run one
# thread's share at a much lower accuracy (torch 2.13, MKL): in fresh processes, cos of a 120 x 32
# table of RoPE angles was off by up to 1.5e-4 on the second thread's rows (3.5e-8 otherwise) in 7 of
# 24, exp 1 of 12, tanh 2 of 12; so the first prefill of a process differed from every later one.
# One call on one thread first (a single element) sets the library up for all of them; from then on
# every call measured the same. Here, because every kernel and the whole engine import this package.
torch.ones(1).cos()


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("LAYERKV_KERNELS", "auto").lower()
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"LAYERKV_KERNELS must be auto, triton or torch, not {mode!r}")
    if mode == "auto":
        return t.is_cuda
    return mode == "triton"
