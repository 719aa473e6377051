"""profile_layers.py's bad input: every problem with its numbers, outputs and --stats files is one
line with exit code 2, before the model loads (never after a profiling pass). Its run end to end,
with generate.py using the plan it writes, is in test_cli.py."""
import json
import os

import pytest

from helpers import assert_clean_error, call

pytestmark = pytest.mark.usefixtures("reuse_models")


@pytest.fixture
def prof(capsys):
    import profile_layers
    return lambda *argv: call(profile_layers.main, list(argv), capsys)


@pytest.mark.parametrize("argv, fragment", [
    (["--floor", "-5"], "--floor must be >= 1"),
    (["--mode", "xkv-tau", "--tau", "5"], "--tau is a mean retention"),
    (["--mode", "xkv-tau", "--tau", "0"], "--tau is a mean retention"),
    (["--tau", "0.9"], "--tau is the target of --mode xkv-tau, not --mode hybrid"),  # ignored otherwise
    (["--mode", "xkv-tau", "--kv-budget", "0.3"], "it has no --kv-budget"),
    (["--plan-policies", "evict,ofload"], "unknown plan policies ['ofload']"),
    (["--prompt-file", os.devnull], "is empty"),  # once a loop doubling no tokens, forever
    (["--mode", "uniform", "--kv-budget", "4KiB", "--ctx", "1k"], "is below the least a uniform plan"),  # once 6x over
    (["--mode", "xkv", "--kv-budget", "4KiB", "--ctx", "1k"], "is below the least an xkv plan"),  # once after profiling
    # outputs: once overwriting each other, or failing after the profiling pass
    (["--out", "x.png", "--png", "x.png"], "--png and --out are both x.png"),
    (["--out", "s.json", "--stats", "s.json"], "--stats and --out are both s.json"),
    (["--png", "prof.xyz"], ".xyz is not a figure format"),
    (["--out", ""], "--out: an empty path"),
    (["--mode", "xkv", "--plan-policies", "quant"], "--mode xkv evicts only"),  # once ignored
    (["--stats", os.path.dirname(os.path.abspath(__file__))], "is a directory"),  # once a bare [Errno 21]
])
def test_profile_layers_numbers_checked_before_loading(prof, argv, fragment):
    ran = prof("--model", "random:tiny", *argv)
    assert_clean_error(ran, fragment)
    assert "loaded" not in ran.stderr  # refused before the model loads


def test_profile_layers_prompt_file_with_an_existing_stats_file_is_refused(prof, tmp_path):
    """An existing --stats file replaces profiling: a --prompt-file beside it would be silently unused."""
    stats, text = tmp_path / "stats.json", tmp_path / "t.txt"
    stats.write_text("{}")
    text.write_text("some text to profile")
    ran = prof("--model", "random:tiny", "--stats", str(stats), "--prompt-file", str(text))
    assert_clean_error(ran, f"--stats {stats} exists, so its statistics are used and --prompt-file would profile nothing")
    assert "loaded" not in ran.stderr


@pytest.mark.parametrize("content", ["[1, 2]", "garbage", '{"model": "random:tiny", "layers": [{"x": 1}, {}]}', "\xff"])
def test_profile_layers_bad_stats_file_names_the_file(prof, tmp_path, content):
    path = tmp_path / "stats.json"
    path.write_bytes(content.encode("latin-1"))
    assert_clean_error(prof("--model", "random:tiny", "--stats", str(path), "--out", str(tmp_path / "p.json")),
                       f"{path}: not a --stats file")


def test_profile_layers_stats_of_another_model_refused_before_loading(prof, tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"model": "random:llama-3.1-8b", "profiled": [], "layers": []}))
    ran = prof("--model", "random:tiny", "--stats", str(path), "--out", str(tmp_path / "p.json"))
    assert_clean_error(ran, "statistics of another model ('random:llama-3.1-8b')")
    assert "loaded" not in ran.stderr


def test_profile_layers_budget_below_the_floor_fails_before_loading(prof):
    ran = prof("--model", "random:tiny", "--ctx", "256")  # 20% of 256 tokens is under the 64-token floor
    assert_clean_error(ran, "is below the least a plan for 256 tokens can take")
    assert "loaded" not in ran.stderr and "profiled" not in ran.stderr


# -- batches: --prompts-file ----------------------------------------------------------------------------------------
