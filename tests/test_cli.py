"""generate.py end to end: the demo path on a random tiny model, and every bad input giving a clear
one-line error with a non-zero exit, never a traceback."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv, timeout=300):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    return proc


def assert_clean_error(proc, fragment):
    """Non-zero exit, no traceback, and the error is one line (the last; progress lines may precede it)."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert sum("error:" in ln for ln in lines) == 1, proc.stderr
    assert "error:" in lines[-1] and fragment in lines[-1], lines[-1]


def test_ctx_not_a_number():
    assert_clean_error(run("--ctx", "abc"), "not a token count")


def test_negative_max_new_tokens():
    assert_clean_error(run("--max-new-tokens", "-3", "--model", "random:tiny"), "--max-new-tokens")


def test_unknown_policy():
    assert_clean_error(run("--policy", "magic"), "invalid choice")


def test_empty_prompt():
    assert_clean_error(run("--prompt", "   ", "--model", "random:tiny"), "empty prompt")


def test_missing_prompt_file(tmp_path):
    assert_clean_error(run("--prompt-file", str(tmp_path / "nope.txt")), "cannot read prompt file")


def test_missing_model_path(tmp_path):
    assert_clean_error(run("--model", str(tmp_path / "absent"), "--prompt", "hi"), "no such model")


def test_directory_without_config(tmp_path):
    assert_clean_error(run("--model", str(tmp_path), "--prompt", "hi"), "no config.json")


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_clean_error(run("--model", str(tmp_path), "--prompt", "hi"), "malformed JSON")


def test_config_not_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_clean_error(run("--model", str(tmp_path), "--prompt", "hi"), "not a Llama model")


def test_corrupt_safetensors(tmp_path):
    from engine.config import preset
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_hf_config()))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!")
    assert_clean_error(run("--model", str(tmp_path), "--prompt", "hi"), "safetensors")


def test_corrupt_gguf_leaves_nothing_in_cache(tmp_path, isolated_cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    before = set(os.listdir(os.path.join(isolated_cache, "layerkv", "gguf"))) if os.path.isdir(
        os.path.join(isolated_cache, "layerkv", "gguf")) else set()
    proc = run("--model", str(bad), "--prompt", "hi")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "broken.gguf" in proc.stderr.splitlines()[-1]
    gguf_dir = os.path.join(isolated_cache, "layerkv", "gguf")
    after = set(os.listdir(gguf_dir)) if os.path.isdir(gguf_dir) else set()
    assert after == before, f"left behind: {after - before}"


def test_long_prompt_middle_is_cut_with_warning(tmp_path):
    stats = tmp_path / "s.json"
    proc = run("--model", "random:tiny", "--prompt", "word " * 400, "--ctx", "100", "--max-new-tokens", "4",
               "--stats-json", str(stats))
    assert proc.returncode == 0, proc.stderr
    assert "cut" in proc.stderr and "middle" in proc.stderr
    assert json.loads(stats.read_text())["prompt_tokens"] == 100


def test_demo_writes_stats(tmp_path):
    stats = tmp_path / "s.json"
    proc = run("--model", "random:tiny", "--ctx", "300", "--max-new-tokens", "5", "--stats-json", str(stats))
    assert proc.returncode == 0, proc.stderr
    assert "pass key" in proc.stderr and "ms/token" in proc.stderr
    s = json.loads(stats.read_text())
    for key in ("prompt_tokens", "generated_ids", "text", "prefill_s", "decode_ms_per_token", "kv_bytes",
                "full_kv_bytes", "layers"):
        assert key in s
    assert s["prompt_tokens"] == 300 and len(s["generated_ids"]) == 5
    assert set(s["kv_bytes"]) == {"device", "host"} and s["kv_bytes"]["host"] == 0
    assert s["kv_bytes"]["device"] >= s["full_kv_bytes"] > 0
    assert len(s["layers"]) == 2 and s["layers"][0]["policy"] == "full"


@pytest.mark.parametrize("flag", ["--help"])
def test_help_documents_every_flag(flag):
    proc = run(flag)
    assert proc.returncode == 0
    for opt in ("--model", "--prompt-file", "--chat", "--ctx", "--max-new-tokens", "--temperature", "--top-p",
                "--top-k", "--seed", "--device", "--dtype", "--policy", "--stats-json"):
        assert opt in proc.stdout


def test_profile_layers_then_generate_with_the_plan(tmp_path):
    plan, png, stats = tmp_path / "plan.json", tmp_path / "p.png", tmp_path / "stats.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "profile_layers.py"), "--model", "random:tiny",
                           "--ctx", "256", "--kv-budget", "0.3", "--floor", "32", "--out", str(plan),
                           "--png", str(png), "--stats", str(stats)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| layer |" in proc.stdout and plan.exists() and png.stat().st_size > 10_000 and stats.exists()
    out = tmp_path / "s.json"
    proc = run("--model", "random:tiny", "--ctx", "256", "--policy", "hybrid", "--plan", str(plan),
               "--max-new-tokens", "4", "--stats-json", str(out))
    assert proc.returncode == 0, proc.stderr
    layers = json.loads(out.read_text())["layers"]
    assert [d["policy"] for d in layers] == [row["policy"] for row in json.loads(plan.read_text())["layers"]]


def test_plan_for_another_model_is_refused(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model": "random:llama-3.1-8b", "n_layers": 32, "layers": []}))
    assert_clean_error(run("--model", "random:tiny", "--policy", "hybrid", "--plan", str(plan), "--prompt", "hi"),
                       "made for model")


def test_bad_kv_budget():
    assert_clean_error(run("--model", "random:tiny", "--policy", "hybrid", "--kv-budget", "lots", "--prompt", "hi"),
                       "not a KV budget")


def test_bad_policy_parameters_are_one_line_errors():
    assert_clean_error(run("--model", "random:tiny", "--policy", "quant", "--kv-bits", "3", "--prompt", "hi"),
                       "bits")
    assert_clean_error(run("--model", "random:tiny", "--policy", "offload", "--budget", "10", "--prompt", "hi"),
                       "budget")
