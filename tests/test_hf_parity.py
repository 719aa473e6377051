"""Logit parity with Hugging Face transformers on tiny random Llama configs saved as safetensors."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.kv import build_policies
from engine.runner import generate
from engine.sampling import SamplingParams
from weights.hf import load_hf

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES = {
    "gqa-untied-llama3rope": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE),
    "gqa-tied-plainrope": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_scaling=None),
    "mha-untied-plainrope": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_scaling=None),
    "mha-tied-llama3rope": dict(num_key_value_heads=4, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=1024, rope_theta=10000.0,
                      **CASES[request.param])
    hf = LlamaForCausalLM(cfg).eval()
    # Random init leaves norms at 1; perturb them so a wrong norm weight cannot hide.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d, safe_serialization=True)
    args, model = load_hf(str(d), "cpu", torch.float32)
    return hf, args, model


def test_logits_match(pair):
    hf, args, model = pair
    # 300 tokens: past the 64-token original context, so llama3 rope scaling's bands all matter.
    tokens = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    policies = build_policies(args, {"policy": "full"}, 300, "cpu", torch.float32)
    ours = model.prefill(tokens, policies, chunk=128, all_logits=True)  # chunking must not matter
    assert (ours - ref).abs().max().item() <= 1e-4


def test_greedy_generation_matches(pair):
    hf, _, model = pair
    prompt = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, 40:].tolist()
    res = generate(model, prompt[0].tolist(), 24, SamplingParams(), {"policy": "full"})
    assert res.generated_ids == ref
