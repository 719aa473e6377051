"""The Llama forward pass, written out by hand: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Two entry points, because their costs differ:
  prefill()      the prompt, *layer-major*: one layer at a time over every prompt token, so only one
                 layer's full K/V exists at once before its KV policy compresses or offloads it;
                 projections, attention and MLP run over chunks of query tokens to bound memory.
  decode_step()  one new token through every layer, for a batch of sequences: small, fixed-shape
                 work, kept free of host decisions so it can be replayed from a CUDA graph.
The KV policies (one per layer) are passed in explicitly; the model owns no cache state.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelArgs
from engine.kv.base import KVPolicy
from engine.rope import inv_frequencies, rope_cos_sin
from kernels.norm import rms_norm
from kernels.prefill_attn import chunk_attention
from kernels.rotary import rope_qk
from kernels.swiglu import silu_mul


class Block(nn.Module):
    """One transformer layer. Q/K/V are fused into one matrix and gate/up into another, so a decode
    step reads each layer's weights in four matmuls.

    Weights are stored (in_features, out_features) and applied as `x @ w`, the transpose of
    nn.Linear's layout: for a single decode token the CPU BLAS runs this layout on all cores
    (measured ~21 GB/s on 2 cores) but nn.Linear's on one (~13 GB/s), and decode is bound by
    reading the weights. On GPU both layouts are equally fast."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, H_kv, D = args.n_heads, args.n_kv_heads, args.head_dim
        self.attn_norm = nn.Parameter(torch.ones(args.dim))
        self.wqkv = nn.Parameter(torch.empty(args.dim, (H + 2 * H_kv) * D))  # columns: [q | k | v]
        self.wo = nn.Parameter(torch.empty(H * D, args.dim))
        self.mlp_norm = nn.Parameter(torch.ones(args.dim))
        self.w_gate_up = nn.Parameter(torch.empty(args.dim, 2 * args.ffn_dim))  # columns: [gate | up]
        self.w_down = nn.Parameter(torch.empty(args.ffn_dim, args.dim))

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: (B, T, dim) -> q (B, H, T, D), k and v (B, H_kv, T, D), RoPE applied to q and k."""
        a = self.args
        B, T, _ = x.shape
        h = rms_norm(x, self.attn_norm, a.norm_eps) @ self.wqkv  # (B, T, (H+2H_kv)*D)
        rope_qk(h, a.n_heads, a.n_kv_heads, cos, sin)  # in place on the q and k columns (kernels/rotary.py)
        q, k, v = h.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim,
                           a.n_kv_heads * a.head_dim], dim=-1)
        q = q.view(B, T, a.n_heads, a.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        return q, k, v

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Only the query part of qkv(): x (B, T, dim) -> q (B, H, T, D) with RoPE."""
        a = self.args
        B, T, _ = x.shape
        q = rms_norm(x, self.attn_norm, a.norm_eps) @ self.wqkv[:, :a.n_heads * a.head_dim]  # (B, T, H*D)
        rope_qk(q, a.n_heads, 0, cos, sin)
        return q.view(B, T, a.n_heads, a.head_dim).transpose(1, 2)

    def mlp_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> silu(gate) * up (..., ffn_dim), the input of the down projection."""
        return silu_mul(rms_norm(x, self.mlp_norm, self.args.norm_eps) @ self.w_gate_up)  # kernels/swiglu.py

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_hidden(x) @ self.w_down


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = nn.Parameter(torch.ones(args.dim))
        self.head = nn.Parameter(torch.empty(args.dim, args.vocab_size))  # output head, (in, out) as above
        # A tied model looks its input embeddings up in the head's columns: no second copy in memory.
        self.embed = None if args.tie_embeddings else nn.Parameter(torch.empty(args.vocab_size, args.dim))
        self.register_buffer("inv_freq", inv_frequencies(args.head_dim, args.rope_theta, args.rope_scaling),
                             persistent=False)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, T, dim)."""
        if self.embed is None:
            return self.head.t()[tokens]  # rows of head^T (vocab, dim), i.e. columns of the head
        return F.embedding(tokens, self.embed)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) final hidden states -> (..., vocab) float32 logits."""
        return (rms_norm(x, self.norm, self.args.norm_eps) @ self.head).float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, policies: list[KVPolicy], chunk: int = 2048,
                all_logits: bool = False, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run the prompt tokens (B, T) through the model layer by layer, handing each layer's K/V
        to its policy. Returns logits (B, vocab) for the last position, or (B, T, vocab) when
        all_logits (tests). `progress(n)` is called after each layer.

        Memory: besides the residual stream x (B, T, dim) and the layer's K/V (B, H_kv, T, D) that
        its policy receives, everything is per chunk of `chunk` query tokens (queries, attention
        output, MLP activations), so prefill's transient memory grows with T only by those."""
        B, T = tokens.shape
        a = self.args
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(T, device=tokens.device), self.head.dtype)
        x = self.embed_tokens(tokens)  # (B, T, dim)
        for layer, policy in zip(self.layers, policies):
            k = torch.empty(B, a.n_kv_heads, T, a.head_dim, device=x.device, dtype=x.dtype)
            v = torch.empty_like(k)
            q_tail = None  # the last policy.q_window queries, for policies that score with them
            for s in range(0, T, chunk):
                e = min(T, s + chunk)
                q, k[:, :, s:e], v[:, :, s:e] = layer.qkv(x[:, s:e], cos[s:e], sin[s:e])
                if policy.q_window:  # a copy of the chunk's last queries (a view would keep q alive)
                    last = q[:, :, -policy.q_window:]
                    q_tail = last.clone() if q_tail is None else torch.cat([q_tail, last], dim=2)
                    q_tail = q_tail[:, :, -policy.q_window:]
                # Queries s..e-1 see keys 0..e-1, all computed by now: chunk j's keys come from
                # x before this layer's update of chunk j, and chunks are updated in order.
                o = chunk_attention(q, k[:, :, :e], v[:, :, :e])  # (B, H, e-s, D)
                x[:, s:e] += o.transpose(1, 2).reshape(B, e - s, -1) @ layer.wo  # residual, in place
                x[:, s:e] += layer.mlp(x[:, s:e])
                del q, o
            policy.prefill(k, v, q_tail)
            del k, v, q_tail  # the policy keeps what it needs; the full K/V goes before the next layer
            if progress is not None:
                progress(1)
        return self.logits(x if all_logits else x[:, -1])

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, seqs: list[list[KVPolicy]]) -> torch.Tensor:
        """One new token for each of B sequences: tokens (B,) at positions pos ((B,) int64 on the
        device) -> logits (B, vocab). seqs[b][i] is sequence b's policy of layer i: sequences of
        different lengths each keep their own cache, so nothing is padded. The dense matmuls run
        over the whole batch (a step reads the weights once however many sequences decode), and
        attention runs per sequence, through its own policy.

        Each policy stores its token's k/v and attends. Nothing here reads a host-side counter, so
        the same code runs eagerly and inside a CUDA graph (engine/graphs.py); the policies'
        host-side work happens before the step, in before_step()."""
        B = tokens.shape[0]
        cos, sin = rope_cos_sin(self.inv_freq, pos, self.head.dtype)  # (B, D): one position per sequence
        cos, sin = cos[:, None, None], sin[:, None, None]  # (B, 1, 1, D), broadcast over (B, H, 1, D)
        x = self.embed_tokens(tokens[:, None])  # (B, 1, dim)
        for i, layer in enumerate(self.layers):
            if i + 1 < len(self.layers) and any(seq[i + 1].wants_lookahead() for seq in seqs):
                # The next layer's query, approximated from this layer's input, so the next
                # layer's KV fetch can run while this layer computes.
                q_hat = self.layers[i + 1].query(x, cos, sin)  # (B, H, 1, D)
                for b, seq in enumerate(seqs):
                    if seq[i + 1].wants_lookahead():
                        seq[i + 1].prepare(q_hat[b:b + 1])
            q, k, v = layer.qkv(x, cos, sin)
            outs = [seq[i].attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], pos[b:b + 1]) for b, seq in enumerate(seqs)]
            o = outs[0] if B == 1 else torch.cat(outs)  # (B, H, 1, D)
            # The residual adds happen inside the matmuls (x += a @ w as one BLAS call with beta 1):
            # two kernels fewer per layer, i.e. fewer nodes in the step's CUDA graph. x is this
            # step's own tensor (the embedding lookup made it), so updating it in place is safe.
            x2 = x.view(B, -1)  # (B, dim)
            x2.addmm_(o.transpose(1, 2).reshape(B, -1), layer.wo)
            x2.addmm_(layer.mlp_hidden(x2), layer.w_down)
        for seq in seqs:
            for policy in seq:
                policy.finish_step()
        return self.logits(x[:, 0])

    # ---- weights -------------------------------------------------------------------------------
    @classmethod
    def empty(cls, args: ModelArgs, device: torch.device | str, dtype: torch.dtype) -> "Llama":
        """Uninitialised weights allocated once, directly in the target dtype and device (building on
        the meta device first avoids a float32 copy: an 8B model would not fit twice)."""
        with torch.device("meta"):
            model = cls(args)
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = nn.Parameter(
                        torch.empty(p.shape, device=device, dtype=dtype), requires_grad=False)
        model.inv_freq = inv_frequencies(args.head_dim, args.rope_theta, args.rope_scaling).to(device)
        return model.eval()

    @classmethod
    def from_hf_state_dict(cls, args: ModelArgs, get: Callable[[str], torch.Tensor],
                           device: torch.device | str, dtype: torch.dtype) -> "Llama":
        """Build from tensors named as in HF LlamaForCausalLM; `get(name)` returns one tensor, so a
        loader can stream them from disk one at a time (peak memory ~ the model, not twice it)."""
        model = cls.empty(args, device, dtype)

        def put(param: nn.Parameter, *names: str, transpose: bool = False):
            ts = [get(n) for n in names]
            w = torch.cat(ts, 0) if len(ts) > 1 else ts[0]  # HF stores (out, in): stack along out
            param.data.copy_(w.t() if transpose else w)

        put(model.norm, "model.norm.weight")
        if model.embed is None:
            put(model.head, "model.embed_tokens.weight", transpose=True)
        else:
            put(model.embed, "model.embed_tokens.weight")
            put(model.head, "lm_head.weight", transpose=True)
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            put(layer.attn_norm, p + "input_layernorm.weight")
            put(layer.wqkv, p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                p + "self_attn.v_proj.weight", transpose=True)
            put(layer.wo, p + "self_attn.o_proj.weight", transpose=True)
            put(layer.mlp_norm, p + "post_attention_layernorm.weight")
            put(layer.w_gate_up, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", transpose=True)
            put(layer.w_down, p + "mlp.down_proj.weight", transpose=True)
        return model

    @classmethod
    def random(cls, args: ModelArgs, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> "Llama":
        """Random weights (std 0.02, norms 1) generated on the target device, for speed/memory runs."""
        model = cls.empty(args, device, dtype)
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.data.fill_(1.0)
            else:
                p.data.normal_(0.0, 0.02, generator=gen)
        return model
