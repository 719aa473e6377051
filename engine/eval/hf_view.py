"""A Hugging Face `LlamaForCausalLM` whose parameters are *views* of our model's tensors, so the peers
in bench.py (transformers' own caches, kvpress presses) run on exactly our weights with no second
copy in memory: at 8B in bfloat16 a copy would be another 16 GB on the GPU.

Our weights are stored (in, out) and applied as `x @ w`, with q/k/v fused into `wqkv` and gate/up
into `w_gate_up` (engine/model.py); nn.Linear keeps (out, in) and computes `x @ weight.T`. So each
HF weight is a column slice of ours, transposed: a strided view, no copy. The HF model must not
be trained or have its weights written: they are ours.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.model import Llama


def _alias(t: torch.Tensor) -> nn.Parameter:
    """A Parameter sharing `t`'s storage (Parameter() aliases its data; it never copies)."""
    return nn.Parameter(t, requires_grad=False)


def hf_view(model: Llama):
    """-> transformers LlamaForCausalLM (eval mode) computing the same function as `model`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    a = model.args
    device, dtype = model.head.device, model.head.dtype
    cfg = LlamaConfig(**{k: v for k, v in a.to_hf_config().items() if k not in ("architectures", "model_type")})
    # transformers >= 4.56 names the dtype `dtype` (older: `torch_dtype`, now a deprecated alias)
    setattr(cfg, "dtype" if hasattr(cfg, "dtype") else "torch_dtype", dtype)
    with torch.device("meta"):  # structure only: every parameter is replaced by a view below
        hf = LlamaForCausalLM(cfg)
    H, H_kv, D = a.n_heads, a.n_kv_heads, a.head_dim
    head_t = model.head.t()  # (vocab, dim) view of the (dim, vocab) head
    hf.lm_head.weight = _alias(head_t)
    # Tied models look embeddings up in the head (as ours does); untied ones have their own table.
    hf.model.embed_tokens.weight = hf.lm_head.weight if model.embed is None else _alias(model.embed)
    hf.model.norm.weight = _alias(model.norm)
    for ours, theirs in zip(model.layers, hf.model.layers):
        q, k, v = ours.wqkv.split([H * D, H_kv * D, H_kv * D], dim=1)  # (dim, out) column blocks
        att = theirs.self_attn
        att.q_proj.weight, att.k_proj.weight, att.v_proj.weight = _alias(q.t()), _alias(k.t()), _alias(v.t())
        att.o_proj.weight = _alias(ours.wo.t())
        gate, up = ours.w_gate_up.chunk(2, dim=1)  # (dim, ffn) each
        theirs.mlp.gate_proj.weight, theirs.mlp.up_proj.weight = _alias(gate.t()), _alias(up.t())
        theirs.mlp.down_proj.weight = _alias(ours.w_down.t())
        theirs.input_layernorm.weight = _alias(ours.attn_norm)
        theirs.post_attention_layernorm.weight = _alias(ours.mlp_norm)
    # The rotary table is a buffer computed from the config, not a weight: build it for real.
    with torch.device(device):
        hf.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    leftover = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"hf_view: tensors left unassigned: {leftover[:4]}")
    return hf.eval()


def shares_storage(hf, model: Llama) -> bool:
    """True when every HF parameter lives inside one of our tensors' storage (tests: no copies)."""
    ours = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return all(p.untyped_storage().data_ptr() in ours for p in hf.parameters())
