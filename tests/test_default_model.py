"""The real default model (SmolLM2-135M-Instruct, shipped as GGUF): our import and forward pass vs
transformers' own GGUF loading of the same file."""
import os

import pytest
import torch

from engine.kv import build_policies
from engine.runner import generate
from engine.sampling import SamplingParams
from weights.gguf_import import import_gguf
from weights.hf import read_config
from weights.load import default_gguf_path

TEXT = ("The history of the lighthouse begins in antiquity. The Pharos of Alexandria, built in the third "
        "century BC, guided ships into the harbour for more than a thousand years. ") * 12


@pytest.fixture(scope="module")
def ref():
    """transformers' model from the same GGUF file: its own reader, dequantization and name mapping."""
    from transformers import AutoModelForCausalLM
    path = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def test_logits_match_transformers(ref, default_model):
    m = default_model
    ids = m.tokenizer.encode(TEXT)[:300]
    assert len(ids) == 300
    tokens = torch.tensor([ids])
    with torch.no_grad():
        expected = ref(tokens).logits
    ours = m.model.prefill(tokens, build_policies(m.args, {"policy": "full"}, 300, "cpu", torch.float32),
                           all_logits=True)
    assert (ours - expected).abs().max().item() <= 1e-3


def test_greedy_32_tokens_match_transformers(ref, default_model):
    m = default_model
    ids = m.tokenizer.encode(TEXT)[:200] + m.tokenizer.encode(" In summary,", bos=False)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    res = generate(m.model, ids, 32, SamplingParams(), {"policy": "full"})
    assert res.generated_ids == expected[0, len(ids):].tolist()


def test_cached_import_is_reused(default_model):
    """The session already imported the GGUF (default_model): asking again finds the cache entry."""
    path = import_gguf(default_gguf_path(), log=lambda msg: pytest.fail(f"re-imported: {msg}"))
    assert read_config(path) == default_model.args
