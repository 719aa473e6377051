"""RoPE rescaling read from model files: a Llama-3.1-style GGUF, whose rescaling llama.cpp keeps as a
tensor of per-frequency divisors (rope_freqs) that the importer turns back into config.json's
rope_scaling, and HF configs in either layout."""
import json
import os

import numpy as np
import pytest
import torch

from engine.config import LLAMA31_ROPE, ModelArgs
from engine.rope import inv_frequencies
from weights.gguf_import import import_gguf, llama3_scaling

gguf = pytest.importorskip("gguf")
THETA = 500000.0


def divisors(head_dim: int, scaling: dict) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs: float32 divisors of each frequency."""
    return (inv_frequencies(head_dim, THETA, None).double()
            / inv_frequencies(head_dim, THETA, scaling).double()).float().numpy()


@pytest.mark.parametrize("head_dim, scaling", [
    (128, LLAMA31_ROPE),  # Llama-3.1-8B/70B
    (64, {**LLAMA31_ROPE, "factor": 32.0}),  # Llama-3.2-1B
    (128, {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
           "original_max_position_embeddings": 4096}),  # not Llama's numbers: found from the blend
    (16, LLAMA31_ROPE),  # one blended frequency only: Llama's numbers, checked
    (32, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 3.0,
          "original_max_position_embeddings": 2048}),  # two blended: the fewest a line is fitted through
])
def test_the_rescaling_is_recovered_from_its_divisors(head_dim, scaling):
    found = llama3_scaling(divisors(head_dim, scaling), head_dim, THETA)
    assert found == {**scaling, "factor": float(scaling["factor"])}
    torch.testing.assert_close(inv_frequencies(head_dim, THETA, found), inv_frequencies(head_dim, THETA, scaling))


def test_no_rescaling_and_unknown_ones():
    assert llama3_scaling(np.ones(64, np.float32), 128, THETA) is None
    with pytest.raises(ValueError, match="not a Llama-3"):
        llama3_scaling(np.linspace(1, 3, 64).astype(np.float32), 128, THETA)
    with pytest.raises(ValueError, match="entries for head_dim 128"):
        llama3_scaling(np.ones(32, np.float32), 128, THETA)
    for bad in (0.0, -1.0, np.nan, np.inf):  # a divisor that is none
        f = np.ones(64, np.float32)
        f[5] = bad
        with pytest.raises(ValueError, match="or non-positive ones"):
            llama3_scaling(f, 128, THETA)


def write_gguf(path, rope_freqs=None, linear=None, tied=False, extra=None):
    dim, heads, kv_heads, ffn, vocab = 128, 2, 1, 64, 32  # head_dim 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(dim)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_feed_forward_length(ffn)
    w.add_context_length(131072)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(dim // heads)
    w.add_vocab_size(vocab)
    rng = np.random.default_rng(0)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    for name, shape in [("token_embd", (vocab, dim)), ("output_norm", (dim,)), ("output", (vocab, dim)),
                        ("blk.0.attn_norm", (dim,)), ("blk.0.attn_q", (dim, dim)), ("blk.0.attn_k", (64, dim)),
                        ("blk.0.attn_v", (64, dim)), ("blk.0.attn_output", (dim, dim)), ("blk.0.ffn_norm", (dim,)),
                        ("blk.0.ffn_gate", (ffn, dim)), ("blk.0.ffn_up", (ffn, dim)), ("blk.0.ffn_down", (dim, ffn)),
                        *([(extra, (dim,))] if extra else [])]:
        if not (tied and name == "output"):  # tied embeddings: the head is token_embd, no tensor of its own
            w.add_tensor(f"{name}.weight", r(*shape))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    if linear is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear)
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()


def test_a_llama31_gguf_imports_with_its_rope_scaling(tmp_path, monkeypatch):
    """Every Llama-3.1/3.2 GGUF has rope_freqs: it was refused as an unknown tensor."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "llama31.gguf"
    write_gguf(path, divisors(64, LLAMA31_ROPE))
    entry = import_gguf(str(path), log=lambda _: None)
    with open(os.path.join(entry, "config.json")) as f:
        assert json.load(f)["rope_scaling"] == LLAMA31_ROPE
    from safetensors import safe_open
    with safe_open(os.path.join(entry, "model.safetensors"), "pt") as f:
        assert not any("rope" in k for k in f.keys())  # a divisor table, not a weight
    bad = tmp_path / "bad.gguf"
    write_gguf(bad, np.linspace(1, 3, 32).astype(np.float32))
    with pytest.raises(ValueError, match="bad.gguf: rope_freqs is not a Llama-3"):
        import_gguf(str(bad), log=lambda _: None)
    assert len(os.listdir(os.path.join(str(tmp_path / "cache"), "layerkv", "gguf"))) == 1  # nothing left of it
    # a rescaling named in the metadata (linear x2) would be lost: refused; linear x1 is none
    write_gguf(tmp_path / "linear2.gguf", linear=2.0)
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'linear' x2.0"):
        import_gguf(str(tmp_path / "linear2.gguf"), log=lambda _: None)
    write_gguf(tmp_path / "linear1.gguf", linear=1.0)
    with open(os.path.join(import_gguf(str(tmp_path / "linear1.gguf"), log=lambda _: None), "config.json")) as f:
        assert json.load(f)["rope_scaling"] is None


def test_config_without_import_and_an_entry_per_dtype(tmp_path, monkeypatch):
    """model_config reads a GGUF's config without dequantizing it (the same config.json the import
    then writes), and each dtype a model runs in gets its own entry, holding exactly the weights
    the loader made from float32 before: the float32 entry's, rounded."""
    from safetensors.torch import load_file
    import weights.gguf_import as gi
    from weights.load import model_config
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = str(tmp_path / "llama31.gguf")
    write_gguf(path, divisors(64, LLAMA31_ROPE))
    imports = []
    real = gi._write_import
    monkeypatch.setattr(gi, "_write_import", lambda *a: imports.append(a[-1]) or real(*a))
    name, args = model_config(path)
    assert imports == [] and name == "llama31.gguf" and args.rope_scaling == LLAMA31_ROPE and not args.tie_embeddings
    write_gguf(tmp_path / "tied.gguf", tied=True)
    assert model_config(str(tmp_path / "tied.gguf"))[1].tie_embeddings
    f32 = import_gguf(path, log=lambda _: None)
    with open(os.path.join(f32, "config.json")) as f:
        assert ModelArgs.from_hf_config(json.load(f), name=name) == args
    bf16 = import_gguf(path, log=lambda _: None, dtype=torch.bfloat16)
    assert imports == [torch.float32, torch.bfloat16] and bf16 == f32 + "-bfloat16"
    assert import_gguf(path, log=lambda _: None, dtype=torch.bfloat16) == bf16 and len(imports) == 2  # reused
    assert import_gguf(path, log=lambda _: None, dtype=torch.float64) == f32  # no float64 entry: float32's
    for entry in (f32, bf16):  # damaged configs: read from the metadata again
        with open(os.path.join(entry, "config.json"), "w") as f:
            f.write("[]")
    assert model_config(path) == (name, args) and len(imports) == 2
    a, b = load_file(os.path.join(f32, "model.safetensors")), load_file(os.path.join(bf16, "model.safetensors"))
    assert set(a) == set(b) and all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].bfloat16()) for k in a)


@pytest.mark.parametrize("extra", ["blk.0.attn_q_norm", "blk.0.attn_q.lora", "vision.patch_embd"])
def test_a_tensor_that_is_not_plain_llama_is_refused_in_one_line(tmp_path, monkeypatch, extra):
    """A GGUF with a tensor this importer does not know (another architecture's, an adapter's) is
    refused by name, and nothing of the import is left in the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    write_gguf(path, extra=extra)
    with pytest.raises(ValueError, match=f"unsupported tensor '{extra}.weight' in GGUF"):
        import_gguf(str(path), log=lambda _: None)
    assert os.listdir(os.path.join(str(tmp_path / "cache"), "layerkv", "gguf")) == []
