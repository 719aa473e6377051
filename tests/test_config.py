"""ModelArgs: the presets are the published models, and a Hugging Face config.json (rope settings in
either layout) is read with its defaults and refused, in one line, when it is not a Llama we run."""
import re

import pytest

from engine.config import LLAMA31_ROPE, ModelArgs, preset

BASE = dict(model_type="llama", hidden_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=32,
            intermediate_size=64)


@pytest.mark.parametrize("name,params", [
    ("llama-3.1-8b", 8_030_261_248), ("llama-3.2-1b", 1_235_814_400),  # 1B ties its embeddings
    ("llama-3.1-70b", 70_553_706_496), ("smollm2-135m", 134_515_008)])
def test_presets_count_the_published_parameters(name, params):
    """The parameter counts of the released checkpoints (their safetensors' totals)."""
    assert preset(name).n_params() == params


def test_presets_derive_head_dim_and_refuse_unknown_names():
    assert preset("llama-3.1-8b").kv_bytes_per_token(2) == 131072  # 128 KiB per token in bf16: 16 GiB at 128k
    assert preset("tiny", dim=128).head_dim == 32  # re-derived from the new dim, not tiny's 16
    assert preset("tiny", head_dim=8).head_dim == 8
    with pytest.raises(ValueError, match="unknown preset 'llama-4'; choose from llama-3.1-8b"):
        preset("llama-4")
    with pytest.raises(ValueError, match="n_heads=4 is not a multiple of n_kv_heads=3"):
        preset("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim=7 must be even"):
        preset("tiny", head_dim=7)


def test_hf_config_defaults_and_round_trip():
    args = ModelArgs.from_hf_config(BASE)
    assert (args.n_kv_heads, args.head_dim, args.norm_eps, args.rope_theta, args.max_seq_len) == (2, 64, 1e-6, 1e4, 2048)
    assert not args.tie_embeddings and args.rope_scaling is None  # absent fields: HF's Llama defaults
    assert ModelArgs.from_hf_config({**BASE, "tie_word_embeddings": True}).tie_embeddings
    # the architecture alone names a Llama (some exporters leave model_type out)
    assert ModelArgs.from_hf_config({**BASE, "model_type": None, "architectures": ["LlamaForCausalLM"]}).dim == 128
    eight_b = preset("llama-3.1-8b")
    assert ModelArgs.from_hf_config(eight_b.to_hf_config(), name="llama-3.1-8b") == eight_b


@pytest.mark.parametrize("change,error", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
     "not a Llama model: model_type='mistral', architectures=['MistralForCausalLM']"),
    ({"attention_bias": True}, "unsupported Llama variant: attention_bias=true"),
    ({"mlp_bias": True}, "unsupported Llama variant: mlp_bias=true"),
    ({"hidden_act": "gelu"}, "unsupported activation 'gelu'"),
    ({"intermediate_size": None}, "config.json lacks required field 'intermediate_size'")])
def test_hf_configs_we_do_not_run_are_refused_by_name(change, error):
    cfg = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ValueError, match="^" + re.escape(error)):
        ModelArgs.from_hf_config(cfg)


@pytest.mark.parametrize("layout", ["rope_scaling", "rope_parameters"])
def test_hf_configs_rope_scaling_in_either_layout(layout):
    """transformers >= 5 writes rope settings as rope_parameters: llama3 there is read as in
    rope_scaling, and a rescaling we do not implement is refused in both (rope_parameters' was
    dropped, and the model ran with plain RoPE: wrong logits, no error)."""
    assert ModelArgs.from_hf_config({**BASE, layout: LLAMA31_ROPE}).rope_scaling == LLAMA31_ROPE
    assert ModelArgs.from_hf_config({**BASE, layout: {"rope_type": "default"}}).rope_scaling is None
    assert ModelArgs.from_hf_config({**BASE, layout: {"rope_theta": 5e5}}).rope_scaling is None
    with pytest.raises(ValueError, match="rope_scaling without a type"):
        ModelArgs.from_hf_config({**BASE, layout: {"factor": 8.0}})
    for kind in ("linear", "dynamic", "yarn"):
        with pytest.raises(ValueError, match=f"unsupported rope_scaling type '{kind}'"):
            ModelArgs.from_hf_config({**BASE, layout: {"rope_type": kind, "factor": 2.0}})
