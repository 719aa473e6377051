"""Model hyper-parameters: one dataclass, a table of named presets, and construction from HF config.json."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    ffn_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama-3.1 style frequency rescaling, as in HF config.json, e.g.
    # {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    #  "original_max_position_embeddings": 8192}; None = plain RoPE.
    rope_scaling: dict | None = None
    max_seq_len: int = 131072
    tie_embeddings: bool = False
    head_dim: int = 0  # 0 = dim // n_heads
    name: str = "custom"

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    def n_params(self) -> int:
        """Weights: embeddings (and an untied head), per layer Wq/Wk/Wv/Wo, the 3 MLP matrices, 2 norms."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        layer = self.dim * (2 * q + 2 * kv) + 3 * self.dim * self.ffn_dim + 2 * self.dim
        return self.vocab_size * self.dim * (1 if self.tie_embeddings else 2) + self.n_layers * layer + self.dim

    def kv_bytes_per_token(self, elem_size: int) -> int:
        """Bytes a full (uncompressed) cache spends per token across all layers: K and V."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * elem_size

    def prefill_bytes(self, tokens: int, elem_size: int, chunk: int = 2048) -> int:
        """The transient memory one sequence's prefill of `tokens` takes besides the caches, at its
        peak (engine/model.py's prefill, in query chunks of `chunk`): for the whole prompt, the
        residual stream (T, dim), the RoPE tables (2 x (T, head_dim)) and one layer's full K and V
        (2 x (T, n_kv_heads, head_dim)); per chunk of C tokens, at the MLP's peak, the q|k|v
        projection (C, (H + 2 H_kv) D), the attention output (C, H D), and the MLP's gate|up
        (C, 2 ffn), silu(gate) and its product with up (2 x (C, ffn); the fused kernel on CUDA
        skips one of these, so there this is ~56 MiB high for Llama-3.1-8B). The policies' own
        prefill temporaries come after the chunks are freed and stay below them (tested:
        tests/test_prefill_chunks.py). E.g. Llama-3.1-8B in bf16 at 128k: 131072 x (4096 + 256 +
        2048) x 2 B = 1.56 GiB, plus 2048 x (6144 + 4096 + 4 x 14336) x 2 B = 0.26 GiB."""
        C, H, H_kv, D = min(chunk, tokens), self.n_heads, self.n_kv_heads, self.head_dim
        whole = tokens * (self.dim + 2 * D + 2 * H_kv * D)
        per_chunk = C * ((H + 2 * H_kv) * D + H * D + 4 * self.ffn_dim)
        return (whole + per_chunk) * elem_size

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "custom") -> "ModelArgs":
        """Build from a Hugging Face LlamaForCausalLM config.json (already parsed)."""
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
            raise ValueError(
                f"not a Llama model: model_type={cfg.get('model_type')!r}, architectures={archs}")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ValueError(f"unsupported Llama variant: {flag}=true")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported activation {act!r} (Llama uses silu)")
        # transformers >= 5 may nest rope settings in rope_parameters (with rope_theta beside them)
        rope_params = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = None
        for source in (cfg.get("rope_scaling"), rope_params):  # either layout: the same check
            kind = (source or {}).get("rope_type", (source or {}).get("type"))
            if kind is None and set(source or {}) - {"rope_theta"}:  # settings of no named type
                raise ValueError(f"rope_scaling without a type: {source} (only 'llama3' is supported)")
            if kind not in (None, "default", "llama3"):  # linear, dynamic, yarn...: once silently dropped
                raise ValueError(f"unsupported rope_scaling type {kind!r} (only 'llama3')")
            if scaling is None and kind == "llama3":
                scaling = dict(source)
        try:
            return cls(
                dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                vocab_size=cfg["vocab_size"], ffn_dim=cfg["intermediate_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
                max_seq_len=cfg.get("max_position_embeddings", 2048),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                head_dim=cfg.get("head_dim") or 0, name=name)
        except KeyError as e:
            raise ValueError(f"config.json lacks required field {e.args[0]!r}") from None

    def to_hf_config(self) -> dict:
        """The inverse of from_hf_config: what we write next to imported weights."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size, "intermediate_size": self.ffn_dim,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings, "head_dim": self.head_dim,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        }


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelArgs] = {
    "llama-3.1-8b": ModelArgs(name="llama-3.1-8b", rope_scaling=LLAMA31_ROPE),
    "llama-3.1-70b": ModelArgs(name="llama-3.1-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                               ffn_dim=28672, rope_scaling=LLAMA31_ROPE),
    "llama-3.2-1b": ModelArgs(name="llama-3.2-1b", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                              ffn_dim=8192, tie_embeddings=True,
                              rope_scaling={**LLAMA31_ROPE, "factor": 32.0}),
    "smollm2-135m": ModelArgs(name="smollm2-135m", dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                              vocab_size=49152, ffn_dim=1536, rope_theta=100000.0, max_seq_len=8192,
                              tie_embeddings=True),
    # For tests and smoke runs: small enough to run anywhere in milliseconds, but it keeps
    # GQA (4 query heads per KV head), llama3 rope scaling and the default model's vocabulary
    # size so the default tokenizer can drive it.
    "tiny": ModelArgs(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=49152,
                      ffn_dim=128, rope_scaling={**LLAMA31_ROPE, "original_max_position_embeddings": 256},
                      max_seq_len=131072),
}


def preset(name: str, **overrides) -> ModelArgs:
    """A named preset, optionally changed: preset("tiny", dim=128). head_dim is re-derived from
    dim / n_heads unless given (every preset uses the derived value)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{"head_dim": 0, **overrides})
