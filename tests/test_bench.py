"""bench.py: the --quick smoke run's JSON has every field with sane values; the transformers view of
our weights computes our logits without copying them; metrics on hand-made cases; bad input."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from engine.config import preset
from engine.hf_view import hf_view, shares_storage
from engine.kv import build_policies, parse_policy
from engine.model import Llama
from engine.peers import cache_bytes, expand_peers
from engine.quality import compare, kl_divergence, perplexity, top1_agreement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*argv, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *argv], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run on the default model (a random-weight preset would skip quality), with a
    shorter context than --quick's 1k and only the peer transformers always has."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = run_bench("--quick", "--ctx", "512", "--peers", "hf-dynamic,kvpress-snapkv", "--no-warmup",
                     "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_json_has_every_field(quick):
    res, stdout = quick
    assert {"command", "date", "device", "torch", "model", "fractions"} <= set(res["meta"])
    cells = {(c["engine"], c["policy"]): c for c in res["cells"]}
    assert {("layerkv", p) for p in ("full", "quant", "evict", "offload", "hybrid")} <= set(cells)
    for (engine, policy), c in cells.items():
        if c["status"] == "skipped":  # only a peer that is not installed may be skipped, with a reason
            assert engine == "kvpress" and c["reason"]
            continue
        assert c["status"] == "ok", c
        assert c["prefill_s"] > 0 and c["decode_ms_per_token"] > 0 and c["decode_steps"] >= 16
        assert 0 < c["kv_ratio"] <= 1 and c["kv_bytes"]["device"] > 0 and c["full_kv_bytes"] > 0
        assert c["peak_memory_bytes"] > 0
        q = c["quality"]
        assert 0 <= q["passkey_acc"] <= 1 and 0 <= q["top1"] <= 1 and q["kl"] >= -1e-6 and q["ppl"] >= 1
        assert f"| {engine} | {policy} |" in stdout  # every cell is a row of the table
    full = cells[("layerkv", "full")]
    assert full["quality"]["kl"] == 0 and full["quality"]["top1"] == 1 and full["kv_ratio"] == 1
    assert cells[("layerkv", "evict")]["kv_ratio"] < 0.5  # 20% of the prompt + the decoded tokens
    # transformers on the same weights with its full cache agrees with our FullKV
    assert cells[("transformers", "hf-dynamic")]["quality"]["kl"] < 1e-4


def test_hf_view_matches_our_logits_without_copies():
    for tied in (True, False):
        args = preset("tiny", vocab_size=300, n_heads=4, n_kv_heads=2, dim=64, tie_embeddings=tied)
        model = Llama.random(args, "cpu", torch.float32, seed=3)
        with torch.no_grad():  # norms away from 1, so a swapped norm weight would show
            for layer in model.layers:
                layer.attn_norm.add_(0.1 * torch.randn_like(layer.attn_norm))
                layer.mlp_norm.add_(0.1 * torch.randn_like(layer.mlp_norm))
        hf = hf_view(model)
        assert shares_storage(hf, model)
        # 300 tokens: past the preset's 256-token original context, so llama3 rope scaling matters
        tokens = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = hf(tokens).logits
        ours = model.prefill(tokens, build_policies(args, {"policy": "full"}, 300, "cpu", torch.float32),
                             all_logits=True)
        assert (ours - ref).abs().max().item() <= 1e-4


def test_cache_bytes_counts_a_dynamic_cache():
    from transformers import DynamicCache
    args = preset("tiny", vocab_size=300)
    hf = hf_view(Llama.random(args, "cpu", torch.float32))
    cache = DynamicCache()
    with torch.no_grad():
        hf(torch.arange(10, 50)[None], past_key_values=cache, use_cache=True)
    assert cache_bytes(cache) == args.kv_bytes_per_token(4) * 40


def test_metrics_on_hand_made_cases():
    x = torch.randn(6, 13)
    assert kl_divergence(x, x).abs().max() < 1e-6
    p, q = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])  # (1/4, 3/4) vs (1/2, 1/2)
    assert abs(kl_divergence(p, q).item() - (0.25 * math.log(0.5) + 0.75 * math.log(1.5))) < 1e-6
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 1.0], [0.0, 1.0]])
    assert abs(top1_agreement(a, b) - 0.75) < 1e-6
    assert abs(perplexity(torch.zeros(3, 50), [1, 2, 3]) - 50.0) < 1e-3  # uniform: ppl = vocab size
    same = compare(x, x.clone(), [0, 1, 2, 3, 4, 5])
    assert same.kl == 0 and same.top1 == 1 and same.ppl == same.ppl_full


def test_parse_policy_and_peers():
    from bench import parse_policies
    assert parse_policies("full,quant:bits=2,residual=128,plan:p.json") == ["full", "quant:bits=2,residual=128",
                                                                           "plan:p.json"]
    assert parse_policy("quant:bits=2,residual=128", "m", 2) == {"policy": "quant", "bits": 2, "residual": 128}
    with pytest.raises(ValueError, match="unknown KV policy"):
        parse_policy("magic", "m", 2)
    with pytest.raises(ValueError, match="not a number"):
        parse_policy("evict:budget=lots", "m", 2)
    assert expand_peers(["transformers"]) == ["hf-dynamic", "hf-quanto4"]
    assert len(expand_peers(["all", "kvpress"])) == 6 and expand_peers(["none"]) == []
    with pytest.raises(ValueError, match="unknown peer"):
        expand_peers(["vllm"])


@pytest.mark.parametrize("argv, fragment", [
    (["--kv-fraction", "1.5"], "must be in (0, 1]"),
    (["--ctx", "abc"], "not a token count"),
    (["--steps", "4"], "--steps must be >= 16"),
    (["--policies", "full,magic"], "unknown policy"),
    (["--peers", "vllm"], "unknown peer"),
])
def test_bad_input_is_one_line(argv, fragment):
    proc = run_bench(*argv, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert fragment in proc.stderr.strip().splitlines()[-1]
