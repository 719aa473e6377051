"""One decode path for every policy: what the GPU runs (Triton kernels reading the position from
device memory, the same launches every step, so a CUDA graph can replay them) equals the CPU path
(torch references reading positions on the host); the device-length attention kernel equals its
reference; on CUDA, graph replay equals eager decoding and the CPU path for every policy (skipped
without a GPU)."""
import pytest
import torch

from engine.config import preset
from engine.model import Llama
from interpreted import check_interpreted
from stepping import decode_logits

ARGS = preset("tiny", vocab_size=300, n_heads=4, n_kv_heads=2, dim=128, n_layers=2)  # head_dim 32
# Small enough for the Triton interpreter; each crosses its policy's step-dependent machinery:
# QuantKV packs a key block at positions 32 and 48 and a value every step; decode eviction fills the
# free slots then evicts; OffloadKV reselects rows every step in each lookahead mode.
SPECS = [
    {"policy": "full"},
    {"policy": "evict", "budget": 24, "window": 4, "evict_during_decode": True},
    {"policy": "quant", "bits": 2, "group": 16, "residual": 16},
    {"policy": "quant", "bits": 2, "group": 16, "residual": 16, "heavy": 0.1},  # 3 held tokens beside the sink
    {"policy": "offload", "budget": 20, "sink": 4, "recent": 8, "lookahead": "none"},
    {"policy": "offload", "budget": 20, "sink": 4, "recent": 8, "lookahead": "layer"},
    {"policy": "offload", "budget": 20, "sink": 4, "recent": 8, "lookahead": "step"},
    {"policy": "offload", "budget": 20, "sink": 4, "recent": 8, "lookahead": "layer", "host": "model"},
]
PROMPT, TOTAL = 30, 50
# On CUDA only (on CPU the cap changes nothing): the overlapped copy on 2 programs inside the graph.
CUDA_SPECS = SPECS + [{"policy": "offload", "budget": 20, "sink": 4, "recent": 8, "lookahead": "step",
                       "copy_programs": 2}]


def spec_id(spec):
    keys = ("policy", "lookahead", "evict_during_decode", "heavy", "copy_programs", "host")
    return "-".join(str(v) for k, v in spec.items() if k in keys)


DEVICE_FORM_CHECK = r"""
import os, torch
from engine.config import preset
from engine.model import Llama
from stepping import decode_logits
from interpreted import shard_of
from test_graphs import ARGS, PROMPT, SPECS, TOTAL
model = Llama.random(ARGS, "cpu", torch.float32, seed=7)
tokens = torch.randint(0, 300, (1, TOTAL), generator=torch.Generator().manual_seed(0))
bad = 0
for spec in shard_of(SPECS):
    out = {}
    for mode in ("torch", "triton"):
        os.environ["LAYERKV_KERNELS"] = mode
        out[mode] = decode_logits(model, tokens, spec, PROMPT)[0]
    same_ids = torch.equal(out["torch"].argmax(-1), out["triton"].argmax(-1))
    if not same_ids or not torch.allclose(out["torch"], out["triton"], rtol=1e-4, atol=1e-4):
        bad += 1
        print("MISMATCH", spec, (out["torch"] - out["triton"]).abs().max().item())
print("cases failed:", bad)
"""


ODD_HEAD_CHECK = DEVICE_FORM_CHECK.replace(
    "model = Llama.random(ARGS,", "model = Llama.random(preset('tiny', vocab_size=300, n_heads=4, n_kv_heads=2, dim=192, "
                                  "n_layers=1),").replace(  # head_dim 48
    "for spec in shard_of(SPECS):", "for spec in [SPECS[i] for i in (0, 1, 3, 4)]:").replace(  # full, evict, quant, offload
    "(1, TOTAL)", "(1, 36)")  # 6 steps: QuantKV packs a key block at 32


def test_a_head_dim_the_kernels_cannot_tile_decodes_on_the_torch_path():
    """head_dim 48 (the kernels' tl.arange and tl.dot tile powers of two >= 16) under the GPU's
    dispatch (interpreted): every policy falls back to its torch attention and decodes as the CPU
    does. QuantKV's attention failed an assertion instead (a model with head_dim 100 would have)."""
    check_interpreted(ODD_HEAD_CHECK)


def test_graphs_only_on_the_triton_kernels(monkeypatch):
    """The graph path needs the Triton kernels (their torch references sync on the host): not for a
    head_dim they do not take, nor with LAYERKV_KERNELS=torch. (CPU tensors stand in for CUDA ones
    through LAYERKV_KERNELS=triton, as in the interpreted kernel tests.)"""
    from engine.graphs import device_kernels
    cpu = torch.device("cpu")
    assert not device_kernels(128, cpu)  # auto: Triton only on CUDA tensors
    monkeypatch.setenv("LAYERKV_KERNELS", "triton")
    assert device_kernels(128, cpu) and device_kernels(64, cpu) and device_kernels(16, cpu)
    assert not device_kernels(80, cpu) and not device_kernels(8, cpu)
    monkeypatch.setenv("LAYERKV_KERNELS", "torch")
    assert not device_kernels(128, cpu)


def test_device_position_kernels_equal_the_cpu_path():
    """Every policy, decoded with the kernels a GPU runs (interpreted) == the torch path."""
    check_interpreted(DEVICE_FORM_CHECK, shards=2)


@pytest.mark.parametrize("spec", CUDA_SPECS, ids=spec_id)
def test_cuda_graph_replay_equals_eager(spec):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CUDA graphs)")
    model = Llama.random(ARGS, "cpu", torch.float32, seed=7).to("cuda")
    tokens = torch.randint(0, 300, (1, TOTAL), generator=torch.Generator().manual_seed(0))
    eager, _ = decode_logits(model, tokens, spec, PROMPT, cuda_graphs=False)
    graph, pols = decode_logits(model, tokens, spec, PROMPT, cuda_graphs=True)
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
    assert [p.length for p in pols] == [TOTAL] * ARGS.n_layers


@pytest.mark.parametrize("spec", CUDA_SPECS, ids=spec_id)
def test_cuda_path_equals_cpu_path(spec):
    """The compiled kernels in a CUDA graph == the CPU's torch path, for every policy. Not bit for
    bit: the model's matmuls round differently on the GPU (tolerance 1e-3), and under QuantKV a value
    within that rounding of a step's boundary takes the neighbouring code: a whole 2-bit step. On CPU,
    weights perturbed by 1e-6 flipped no code here (logits within 3e-6); by 1e-4, enough to flip
    some, they moved 2-bit logits by 5e-3 to 1.3e-2 (FullKV's by 2.5e-4): 5e-2 for QuantKV."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (compiled kernels)")
    model = Llama.random(ARGS, "cpu", torch.float32, seed=7)
    tokens = torch.randint(0, 300, (1, TOTAL), generator=torch.Generator().manual_seed(0))
    cpu, _ = decode_logits(model, tokens, spec, PROMPT)
    gpu, _ = decode_logits(model.to("cuda"), tokens, spec, PROMPT, cuda_graphs=True)
    tol = 5e-2 if spec["policy"] == "quant" else 1e-3
    torch.testing.assert_close(gpu, cpu, rtol=tol, atol=tol)


@pytest.mark.parametrize("spec", CUDA_SPECS, ids=spec_id)
def test_cuda_bfloat16_graph_near_cpu_float32(spec):
    """The model's dtype on a GPU, bfloat16, through every compiled kernel in a CUDA graph, against
    the CPU's float32 path on the same (bfloat16-rounded) weights. The interpreter cannot check the
    kernels' bfloat16 dots (triton-lang/triton#11584), so this is their end-to-end check. On the
    CPU the torch path in bfloat16 lands this far from float32, as a share of the logits' scale:
    FullKV 0.005, QuantKV 0.04, eviction 0.07, OffloadKV 0.11 (rounding changes which rows are
    selected or evicted); a broken kernel lands orders of magnitude off."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (compiled kernels)")
    model = Llama.random(ARGS, "cpu", torch.float32, seed=7)
    for p in model.parameters():  # weights a bfloat16 model holds exactly
        p.data = p.data.to(torch.bfloat16).float()
    tokens = torch.randint(0, 300, (1, TOTAL), generator=torch.Generator().manual_seed(0))
    cpu, _ = decode_logits(model, tokens, spec, PROMPT)
    model_bf16 = Llama.empty(ARGS, "cuda", torch.bfloat16)
    model_bf16.load_state_dict(model.state_dict())
    gpu, _ = decode_logits(model_bf16, tokens, spec, PROMPT, cuda_graphs=True)
    err = ((gpu.float() - cpu).abs().max() / cpu.abs().max()).item()
    assert err < 0.3, err
