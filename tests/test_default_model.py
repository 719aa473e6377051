"""The real default model (SmolLM2-135M-Instruct, shipped as GGUF): our import and forward pass vs
transformers' own GGUF loading of the same file."""
import os

import pytest
import torch

from engine.kv import build_policies
from engine.runner import generate
from engine.sampling import SamplingParams
from weights.load import DEFAULT_MODEL, default_gguf_path, load_model

TEXT = ("The history of the lighthouse begins in antiquity. The Pharos of Alexandria, built in the third "
        "century BC, guided ships into the harbour for more than a thousand years. ") * 12


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM
    path = default_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    return ref, load_model(DEFAULT_MODEL, "cpu", torch.float32, log=lambda _: None)


def test_logits_match_transformers(models):
    ref, m = models
    ids = m.tokenizer.encode(TEXT)[:300]
    assert len(ids) == 300
    tokens = torch.tensor([ids])
    with torch.no_grad():
        expected = ref(tokens).logits
    ours = m.model.prefill(tokens, build_policies(m.args, {"policy": "full"}, 300, "cpu", torch.float32),
                           all_logits=True)
    assert (ours - expected).abs().max().item() <= 1e-3


def test_greedy_32_tokens_match_transformers(models):
    ref, m = models
    ids = m.tokenizer.encode(TEXT)[:200] + m.tokenizer.encode(" In summary,", bos=False)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    res = generate(m.model, ids, 32, SamplingParams(), {"policy": "full"})
    assert res.generated_ids == expected[0, len(ids):].tolist()


def test_cached_import_is_reused(models):
    _, m = models
    again = load_model(DEFAULT_MODEL, "cpu", torch.float32, log=lambda msg: pytest.fail(f"re-imported: {msg}"))
    assert again.args == m.args
