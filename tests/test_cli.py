"""generate.py end to end: the demo on a random 2-layer model, a plan written by profile_layers.py
and used by generate.py, and every bad input giving a clear one-line error with exit code 2, never a
traceback (profile_layers.py's own: test_profile_layers_cli.py). The cases call each script's main(argv) in this process (the
default model and tokenizer loaded once, see conftest.reuse_models); one test per script runs it
as a subprocess, as a user would."""
import json
import os

import pytest

import generate
from helpers import TINY, assert_clean_error, script

pytestmark = pytest.mark.usefixtures("reuse_models")


def test_demo_writes_stats(tiny_model_dir, tmp_path):
    """The subprocess smoke test of generate.py: the pass-key demo on a 2-layer model streams,
    reports and writes its stats."""
    stats = tmp_path / "s.json"
    ran = script("generate.py", "--model", tiny_model_dir, "--ctx", "300", "--max-new-tokens", "5",
                 "--stats-json", str(stats))
    assert ran.returncode == 0, ran.stderr
    assert "pass key" in ran.stderr and "ms/token" in ran.stderr
    s = json.loads(stats.read_text())
    for key in ("prompt_tokens", "generated_ids", "text", "prefill_s", "decode_ms_per_token", "kv_bytes",
                "full_kv_bytes", "layers"):
        assert key in s
    assert s["prompt_tokens"] == 300 and len(s["generated_ids"]) == 5
    assert set(s["kv_bytes"]) == {"device", "host"} and s["kv_bytes"]["host"] == 0
    assert s["kv_bytes"]["device"] == s["full_kv_bytes"] > 0  # FullKV is FullKV, whenever the run stops
    assert len(s["layers"]) == 2 and s["layers"][0]["policy"] == "full"


def test_help_documents_every_flag(gen):
    ran = gen("--help")
    assert ran.returncode == 0
    for opt in ("--model", "--prompt-file", "--chat", "--ctx", "--max-new-tokens", "--temperature", "--top-p",
                "--top-k", "--seed", "--device", "--dtype", "--policy", "--stats-json"):
        assert opt in ran.stdout


def test_long_prompt_middle_is_cut_with_warning(gen, tmp_path):
    stats = tmp_path / "s.json"
    ran = gen("--model", "random:tiny", "--prompt", "word " * 400, "--ctx", "100", "--max-new-tokens", "4",
              "--stats-json", str(stats))
    assert ran.returncode == 0, ran.stderr
    assert "cut" in ran.stderr and "middle" in ran.stderr
    assert json.loads(stats.read_text())["prompt_tokens"] == 100


def test_profile_layers_then_generate_with_the_plan(gen, tiny_model_dir, tmp_path):
    """The subprocess smoke test of profile_layers.py; generate.py then follows its plan layer by layer."""
    plan, png, stats = tmp_path / "plan.json", tmp_path / "p.png", tmp_path / "stats.json"
    ran = script("profile_layers.py", "--model", tiny_model_dir, "--ctx", "256", "--kv-budget", "0.3", "--floor", "32",
                 "--out", str(plan), "--png", str(png), "--stats", str(stats))
    assert ran.returncode == 0, ran.stderr
    assert "| layer |" in ran.stdout and plan.exists() and png.stat().st_size > 10_000 and stats.exists()
    out = tmp_path / "s.json"
    ran = gen("--model", tiny_model_dir, "--ctx", "256", "--policy", "hybrid", "--plan", str(plan),
              "--max-new-tokens", "4", "--stats-json", str(out))
    assert ran.returncode == 0, ran.stderr
    layers = json.loads(out.read_text())["layers"]
    assert [d["policy"] for d in layers] == [row["policy"] for row in json.loads(plan.read_text())["layers"]]


# -- bad input: one line, exit code 2 ---------------------------------------------------------------------------
def test_ctx_not_a_number(gen):
    assert_clean_error(gen("--ctx", "abc"), "not a token count")


def test_negative_max_new_tokens(gen):
    assert_clean_error(gen("--max-new-tokens", "-3", "--model", "random:tiny"), "--max-new-tokens")


def test_unknown_policy(gen):
    assert_clean_error(gen("--policy", "magic"), "magic")


def test_empty_prompt(gen):
    assert_clean_error(gen("--prompt", "   ", "--model", "random:tiny"), "empty prompt")


def test_missing_prompt_file(gen, tmp_path):
    assert_clean_error(gen("--prompt-file", str(tmp_path / "nope.txt")), "cannot read prompt file")


def test_missing_model_path(gen, tmp_path):
    assert_clean_error(gen("--model", str(tmp_path / "absent"), "--prompt", "hi"), "no such model")


def test_directory_without_config(gen, tmp_path):
    assert_clean_error(gen("--model", str(tmp_path), "--prompt", "hi"), "no config.json")


def test_malformed_config(gen, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_clean_error(gen("--model", str(tmp_path), "--prompt", "hi"), "malformed JSON")


def test_config_not_llama(gen, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_clean_error(gen("--model", str(tmp_path), "--prompt", "hi"), "not a Llama model")


def test_corrupt_safetensors(gen, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_config()))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!")
    assert_clean_error(gen("--model", str(tmp_path), "--prompt", "hi"), "safetensors")


def test_corrupt_gguf_leaves_nothing_in_cache(gen, tmp_path, isolated_cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    gguf_dir = os.path.join(isolated_cache, "layerkv", "gguf")
    before = set(os.listdir(gguf_dir)) if os.path.isdir(gguf_dir) else set()
    assert_clean_error(gen("--model", str(bad), "--prompt", "hi"), "broken.gguf")
    after = set(os.listdir(gguf_dir)) if os.path.isdir(gguf_dir) else set()
    assert after == before, f"left behind: {after - before}"


def test_plan_for_another_model_is_refused(gen, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model": "random:llama-3.1-8b", "n_layers": 32, "layers": []}))
    assert_clean_error(gen("--model", "random:tiny", "--policy", "hybrid", "--plan", str(plan), "--prompt", "hi"),
                       "made for model")


def test_bad_kv_budget(gen):
    assert_clean_error(gen("--model", "random:tiny", "--policy", "hybrid", "--kv-budget", "lots", "--prompt", "hi"),
                       "not a KV budget")


@pytest.mark.parametrize("argv, fragment", [
    (["--policy", "quant", "--kv-bits", "3"], "QuantKV bits must be 1, 2 or 4"),
    (["--policy", "quant:group=48"], "group 48 must divide head_dim"),  # a value only the model's shapes refuse
    (["--policy", "offload", "--budget", "10"], "budget 10 < sink"),
    (["--policy", "offload:channels=999"], "channels must be in [1, head_dim"),
    (["--policy", "quant", "--kv-sink", "-1"], "sink"),
    (["--policy", "evict:budget=4"], "budget 4 < window 32"),
    (["--policy", "offload", "--kv-rotate", "kv"], "applies to quant"),
])
def test_bad_policy_parameters_are_refused_before_loading(gen, argv, fragment):
    """Every value is checked against the model's config, read without its weights (16 GB at 8B)."""
    ran = gen("--model", "random:tiny", "--prompt", "hi", *argv)
    assert_clean_error(ran, fragment)
    assert "loaded" not in ran.stderr


@pytest.mark.parametrize("argv, fragment", [
    (["--policy", "full", "--kv-budget", "20%"], "--kv-budget is for --policy hybrid without --plan, not --policy full"),
    (["--policy", "quant", "--plan-policies", "quant"], "--plan-policies is for --policy hybrid without --plan"),
    (["--policy", "hybrid", "--plan", "p.json", "--profile-tokens", "1k"], "--profile-tokens is for --policy hybrid "
                                                                           "without --plan, not --plan"),
    (["--policy", "hybrid", "--kv-budget", "lots"], "not a KV budget: 'lots'"),
    (["--policy", "bogus"], "unknown --policy 'bogus'; choose from full, quant, offload, evict or hybrid"),
    (["--policy", "hybrid", "--kv-budget", "150%"], "KV budget '150%' is more than FullKV's bytes"),
    (["--policy", "hybrid", "--kv-budget", "2.0"], "KV budget '2.0': a fraction of FullKV is at most 1"),
    (["--depth", "2"], "--depth must be in [0, 1], got 2.0"),
    (["--depth", "0.3", "--prompt", "hi"], "--depth places the demo's pass key"),
    (["--policy", "hybrid", "--plan-policies", "evict,ofload"], "unknown plan policies ['ofload']"),
    (["--policy", "hybrid", "--kv-budget", "0.1%", "--ctx", "2k"], "is below the least a plan for 2048 tokens"),
    (["--chat"], "--chat is for a prompt of your own"),  # the demo's haystack is token ids
    (["--top-k", "5"], "--top-k applies when sampling: give --temperature > 0"),  # greedy ignores it
    (["--top-p", "0.9"], "--top-p applies when sampling"),
    (["--allow-special"], "--allow-special is for a prompt of your own"),
    (["--chat", "--allow-special", "--prompt", "hi"], "--allow-special is for a raw prompt"),
])
def test_flags_that_would_change_nothing_are_refused_before_loading(gen, argv, fragment):
    """A planning flag given to a run that does not plan, or --depth to a run with no demo, would be
    silently ignored: refused instead, before the load."""
    ran = gen("--model", "random:tiny", *argv)
    assert_clean_error(ran, fragment)
    assert "loaded" not in ran.stderr


def test_a_hybrid_budget_is_checked_against_the_prompts_own_tokens_before_loading(gen, tmp_path):
    """A prompt of one's own is counted by the model's tokenizer, read without the weights, so a
    budget below every plan for it fails before the load (16 GB at 8B), as the demo's does. A
    batch's error names its prompt, as the API's does."""
    text = "The quick brown fox jumps over the lazy dog. " * 40  # 401 tokens with BOS
    ran = gen("--model", "random:tiny", "--policy", "hybrid", "--kv-budget", "1%", "--prompt", text)
    assert_clean_error(ran, "is below the least a plan for 401 tokens can take")
    assert "loaded" not in ran.stderr
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps({"prompt": text, "max_new_tokens": 4}) + "\n" + json.dumps("hi there") + "\n")
    ran = gen("--model", "random:tiny", "--policy", "hybrid", "--kv-budget", "20%", "--prompts-file", str(batch))
    assert_clean_error(ran, "prompt 1: KV budget")  # 20% of 401 tokens is a plan; of 3 tokens, none
    assert "loaded" not in ran.stderr


def test_policy_flags_reach_the_policy():
    a = generate.build_parser().parse_args(["--policy", "quant", "--kv-bits", "2", "--kv-rotate", "none",
                                            "--kv-sink", "4", "--kv-clip", "kv"])
    assert generate.policy_arg(a) == "quant:bits=2,rotate=none,sink=4,clip=kv"
    a = generate.build_parser().parse_args(["--policy", "offload:budget=256", "--host-store", "8bit",
                                            "--lookahead", "layer"])
    assert generate.policy_arg(a) == "offload:budget=256,lookahead=layer,host=8bit"
    a = generate.build_parser().parse_args(["--policy", "evict", "--budget", "64", "--evict-during-decode"])
    assert generate.policy_arg(a) == "evict:budget=64,evict_during_decode=1"  # a switch: on when given


def test_closed_stdout_ends_quietly():
    """`generate.py | head -c 1`: the reader leaves early; no traceback, no 'Broken pipe', exit 0."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "generate.py", "--model", "random:tiny", "--prompt", "hi",
                             "--max-new-tokens", "400"], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()  # the reader is gone
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "Broken pipe" not in err, err


def test_ctrl_c_while_importing_ends_without_a_traceback():
    """Ctrl-C in the first second (torch still importing, before cli() handles it) printed a
    traceback; now the program ends quietly there, and with "interrupted" later."""
    import signal
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "generate.py", "--model", "random:tiny"], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode in (-signal.SIGINT, 130) and "Traceback" not in err, err


def test_outputs_never_replace_an_input_and_an_unused_decode_is_not_timed(gen, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    assert_clean_error(gen("--model", "random:tiny", "--prompts-file", str(prompts), "--out", str(prompts)),
                       "is the --prompts-file file: it would be overwritten")
    assert_clean_error(gen("--model", "random:tiny", "--stats-json", ""), "--stats-json: an empty path")
    stats = tmp_path / "s.json"  # one new token: chosen by the prefill, no decode step to time
    ran = gen("--model", "random:tiny", "--ctx", "256", "--max-new-tokens", "1", "--stats-json", str(stats))
    assert ran.returncode == 0 and "decode none" in ran.stderr
    got = json.loads(stats.read_text())
    assert got["decode_steps"] == 0 and got["decode_ms_per_token"] is None
    # none asked for: nothing to time and no pass key to judge (it said "NOT retrieved")
    ran = gen("--model", "random:tiny", "--ctx", "256", "--max-new-tokens", "0", "--stats-json", str(stats))
    assert ran.returncode == 0 and "none (no new tokens asked for)" in ran.stderr
    assert "not checked (no tokens generated)" in ran.stderr
    assert json.loads(stats.read_text())["passkey"]["retrieved"] is None


@pytest.mark.parametrize("policy", ["full", "hybrid"])
def test_a_demo_context_too_short_for_a_haystack_fails_before_loading(gen, policy):
    """It failed after the weights loaded, and a hybrid's budget check blamed the budget instead."""
    ran = gen("--model", "random:tiny", "--ctx", "60", "--policy", policy)
    assert_clean_error(ran, "a pass-key prompt needs at least")
    assert "loaded" not in ran.stderr


def test_special_token_text_in_a_prompt_stays_text(gen, tmp_path):
    """'<|im_end|>' typed in a prompt is several text tokens; --allow-special makes it the control token."""
    counts = {}
    for extra in ((), ("--allow-special",)):
        stats = tmp_path / "s.json"
        ran = gen("--model", "random:tiny", "--prompt", "<|im_end|>", "--max-new-tokens", "1",
                  "--stats-json", str(stats), *extra)
        assert ran.returncode == 0, ran.stderr
        counts[extra] = json.loads(stats.read_text())["prompt_tokens"]
    assert counts[()] > counts[("--allow-special",)]


@pytest.mark.parametrize("layer0, fragment", [
    ({"policy": "evict", "budget": "lots"}, "layer 0: evict budget='lots' is not a whole number"),
    ({"policy": "evict", "budget": True}, "is not a whole number"),
    ({"policy": "full", "frob": 1}, "layer 0: full has no parameter 'frob'"),
    ({"policy": "quant", "rotate": 1}, "quant rotate=1 is not a word"),
    ({"policy": "magic"}, "unknown KV policy 'magic'"),
    ({"policy": "evict", "budget": 4}, "BudgetedEvictKV budget 4 < window 32"),  # in range only for the model
])
def test_bad_plan_layers_are_refused_before_loading(gen, tmp_path, layer0, fragment):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model": "random:tiny", "layers": [layer0, {"policy": "full"}]}))
    ran = gen("--model", "random:tiny", "--prompt", "hi", "--policy", "hybrid", "--plan", str(plan))
    assert_clean_error(ran, fragment)
    assert "loaded" not in ran.stderr


def test_prompts_file_writes_one_result_per_prompt_in_order(gen, tiny_model_dir, tmp_path):
    """Three prompts of different lengths and limits, generated as one batch: the JSONL results come
    back in the file's order, each equal to that prompt generated alone."""
    batch, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    lines = ['"hello world hello"', "", json.dumps({"prompt": "world " * 30, "max_new_tokens": 2}),
             json.dumps({"prompt": "hello"})]
    batch.write_text("\n".join(lines) + "\n")
    ran = gen("--model", tiny_model_dir, "--prompts-file", str(batch), "--max-new-tokens", "5", "--out", str(out),
              "--policy", "evict:budget=8,window=4")
    assert ran.returncode == 0, ran.stderr
    assert "3 prompts" in ran.stderr and "tokens/s" in ran.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in results] == [0, 1, 2] and len(results[1]["token_ids"]) <= 2
    for r, prompt, n in zip(results, ["hello world hello", "world " * 30, "hello"], [5, 2, 5]):
        alone = tmp_path / "alone.json"
        ran = gen("--model", tiny_model_dir, "--prompt", prompt, "--max-new-tokens", str(n),
                  "--policy", "evict:budget=8,window=4", "--stats-json", str(alone))
        assert ran.returncode == 0, ran.stderr
        assert json.loads(alone.read_text())["generated_ids"] == r["token_ids"]


@pytest.mark.parametrize("content, fragment", [
    ("", "holds no prompts"), ("{not json\n", "line 1: not JSON"), ('"a"\n42\n', "line 2: expected a string"),
    ('{"prompt": "a", "temperature": 1}\n', "line 1: expected"), ('{"prompt": "a", "max_new_tokens": -1}\n', "line 1: max_new_tokens"),
    ('"ok"\n"  "\n', "line 2: empty prompt"), (b"\xff\xfe", "cannot read --prompts-file")])
def test_bad_prompts_files_fail_before_loading(gen, tmp_path, content, fragment):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_clean_error(gen("--model", str(tmp_path / "absent"), "--prompts-file", str(path)), fragment)


def test_prompts_file_conflicts(gen, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('"a"\n')
    assert_clean_error(gen("--prompts-file", str(path), "--prompt", "b"), "not both")
    assert_clean_error(gen("--prompt", "b", "--out", str(tmp_path / "o.jsonl")), "--out is for --prompts-file")
    assert_clean_error(gen("--prompts-file", str(tmp_path / "none.jsonl")), "cannot read --prompts-file")
    assert_clean_error(gen("--prompts-file", str(path), "--out", str(tmp_path / "no" / "o.jsonl")), "no such directory")
