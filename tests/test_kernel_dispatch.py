"""Which path each kernel's dispatch takes: the Triton kernel or the torch reference.

Every fused kernel takes only some shapes (a power-of-two head, a contiguous row, a size that fits
in registers), and its dispatch function sends the rest to the reference. On a CPU the reference
always runs, so the other tests never see those conditions: a wrong one would surface on a GPU only,
as a compile error (tl.arange of a length that is not a power of two) or a silently wrong result (an
rms_norm whose float32 weight meets bfloat16 activations returns float32 from the reference and
bfloat16 from the kernel). Here LAYERKV_KERNELS=triton makes CPU tensors count as the kernels'
(kernels/__init__.py), and both paths are replaced by recorders, so nothing is launched: each case
asks only which one was called."""
from types import SimpleNamespace

import pytest
import torch

import kernels.dense_attn as dense_attn
import kernels.norm as norm
import kernels.prefetch as prefetch
import kernels.rotary as rotary
import kernels.slots as slots
import kernels.sparse_attn as sparse_attn
import kernels.swiglu as swiglu

BF16, F32 = torch.bfloat16, torch.float32


def z(*shape, dtype=F32):
    return torch.zeros(*shape, dtype=dtype)


def rope_args(D, contiguous=True):
    h = z(1, 2, 3 * D) if contiguous else z(1, 3 * D, 2).transpose(1, 2)  # (B, T, (n_q + 2 n_kv) D)
    return (h, 1, 1, z(2, D), z(2, D))


def gather_args(D, dst_contiguous=True):
    dst = z(1, 1, 8, D) if dst_contiguous else z(1, 1, D, 8).transpose(2, 3)
    return (z(16, D), z(16, D), None, None, None, dst, dst, 0)


def row_args(new_stride_one=True):
    k = z(1, 2, 8, 16)
    new = z(1, 2, 1, 16) if new_stride_one else z(1, 2, 1, 32)[..., ::2]  # every other element
    return (k, k, new, new, torch.zeros(1, dtype=torch.long))


# dispatch function -> (its module, the kernel's name, the reference's name)
PATHS = {"rms_norm": (norm, "rms_norm_triton", "rms_norm_ref"),
         "rope_qk": (rotary, "rope_qk_triton", "rope_qk_ref"),
         "silu_mul": (swiglu, "silu_mul_triton", "silu_mul_ref"),
         "dense_decode_attention": (dense_attn, "dense_decode_attention_triton", "dense_decode_attention_ref"),
         "write_row": (dense_attn, "write_row_triton", "write_row_ref"),
         "gather_rows": (prefetch, "gather_rows_triton", "gather_rows_ref"),
         "assign_slots": (slots, "assign_slots_triton", "assign_slots_ref"),
         "approx_scores": (sparse_attn, "approx_scores_triton", "approx_scores_ref")}

# (dispatch function, arguments, the kernel expected)
CASES = [
    ("rms_norm", (z(2, 576), z(576), 1e-5), True),
    ("rms_norm", (z(2, 576, dtype=BF16), z(576), 1e-5), False),
    ("rms_norm", (z(1, 65536), z(65536), 1e-5), True),
    ("rms_norm", (z(1, 65537), z(65537), 1e-5), False),
    ("rope_qk", rope_args(64), True),
    ("rope_qk", rope_args(32), True),  # half 16: the smallest
    ("rope_qk", rope_args(16), False),
    ("rope_qk", rope_args(80), False),  # half 40
    ("rope_qk", rope_args(64, contiguous=False), False),
    ("silu_mul", (z(2, 2 * 96),), True),
    ("silu_mul", (z(2, 2 * 96 + 1),), False),
    ("dense_decode_attention", (z(1, 4, 1, 64), None, None, None), True),
    ("dense_decode_attention", (z(1, 4, 1, 16), None, None, None), True),  # the smallest tl.dot takes
    ("dense_decode_attention", (z(1, 4, 1, 8), None, None, None), False),
    ("dense_decode_attention", (z(1, 4, 1, 96), None, None, None), False),
    ("write_row", row_args(), True),
    ("write_row", row_args(new_stride_one=False), False),
    ("gather_rows", gather_args(64), True),
    ("gather_rows", gather_args(48), False),
    ("gather_rows", gather_args(64, False), False),
    ("assign_slots", (None, z(1, slots.MAX_K), 1), True),
    ("assign_slots", (None, z(1, slots.MAX_K + 1), 1), False),
    ("approx_scores", (z(1, 4, 1, 64), SimpleNamespace(chan=z(1, 1, 4))), True),
    ("approx_scores", (z(1, 4, 1, 64), SimpleNamespace(chan=z(1, 1, 2))), False),
    ("approx_scores", (z(1, 4, 1, 64), SimpleNamespace(chan=z(1, 1, 24))), False),
]


def route(monkeypatch, mode, dispatch, args) -> str:
    """Call dispatch(*args) with LAYERKV_KERNELS=mode; the name of the path it took."""
    module, kernel, ref = PATHS[dispatch]
    taken = []
    monkeypatch.setenv("LAYERKV_KERNELS", mode)
    monkeypatch.setattr(module, kernel, lambda *a, **k: taken.append(kernel))
    monkeypatch.setattr(module, ref, lambda *a, **k: taken.append(ref))
    getattr(module, dispatch)(*args)
    assert len(taken) == 1, taken
    return taken[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'kernel' if c[2] else 'ref'}")
def test_dispatch_sends_only_the_shapes_a_kernel_takes_to_it(monkeypatch, case):
    dispatch, args, fused = case
    _, kernel, ref = PATHS[dispatch]
    assert route(monkeypatch, "triton", dispatch, args) == (kernel if fused else ref)
    # and with the kernels off (or on CPU tensors, the default), the reference always
    assert route(monkeypatch, "torch", dispatch, args) == ref
    assert route(monkeypatch, "auto", dispatch, args) == ref
