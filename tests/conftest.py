"""Shared fixtures. Tests never touch the user's cache: imports go to a per-session directory."""
import functools
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("xdg_cache"))
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = path
    yield path
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def gguf_parsed_once():
    """The gguf package parses a file's metadata item by item: about 3 s for the default model's
    49k-token vocabulary, and our importer, the reference readings of tests/test_gguf_meta.py and
    transformers' model and tokenizer loaders each parse that file (transformers twice; our
    tokenizer reads the header itself, weights/gguf_meta.py). Within a session each unchanged file is
    parsed once (a reader is a read-only memory map), and the tensor-name table transformers builds
    per tensor is built once. The code under test runs unchanged on the shared reader."""
    try:
        import gguf
    except ImportError:
        yield
        return
    real_reader, readers = gguf.GGUFReader, {}

    def shared_reader(path, mode="r"):
        if mode != "r":
            return real_reader(path, mode)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key not in readers:  # a file that does not parse raises here, as it would uncached
            readers[key] = real_reader(path)
        return readers[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", shared_reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="session")
def default_model(isolated_cache):
    """The shipped SmolLM2-135M-Instruct (weights.load.Loaded), float32 on the CPU, imported into the
    session cache and loaded once for every test that needs it. Tests read it; none changes it.

    What is alive once it has loaded (it, the parsed GGUF, torch and transformers) lives for the
    whole session, so it is moved out of the garbage collector's sweeps (gc.freeze): bench.py runs
    gc.collect() around every cell it measures, and each sweep through those objects took 0.25 s."""
    import gc

    import torch

    from weights.load import load_model
    loaded = load_model(None, "cpu", torch.float32, log=lambda _: None)
    gc.freeze()
    yield loaded
    gc.unfreeze()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random 2-layer Llama saved as a Hugging Face directory with a small tokenizer (helpers)."""
    from helpers import write_tiny_hf_model
    folder = tmp_path_factory.mktemp("tiny-llama")
    write_tiny_hf_model(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_llm():
    """The tiny preset (random weights, 2 layers, the default model's tokenizer or the byte one) as an
    LLM on the CPU in float32: the bench harness's loops run on it in seconds. One per test module,
    which may change it (test_matrix.py renames it so that quality runs)."""
    from engine import LLM
    return LLM("random:tiny", "cpu", "float32")


@pytest.fixture
def reuse_models(monkeypatch, request):
    """For CLIs called in-process: the default model (CPU, float32) is the session's, and random:
    presets get its tokenizer, instead of loading them again. Every other model loads as usual;
    the subprocess smoke tests still load everything for real. Without the default model (the GPU
    machine's image: the 98 MB file does not travel) nothing is shared, and random: presets get the
    byte tokenizer, as they do there outside the tests."""
    import torch

    import weights.load as wl
    try:
        gguf_path = wl.default_gguf_path()
    except ValueError:
        return
    default_model = request.getfixturevalue("default_model")
    load_model, load_tokenizer = wl.load_model, wl.load_tokenizer

    def shared_load_model(spec, device, dtype, log=print):
        if spec in (None, wl.DEFAULT_MODEL) and str(device) == "cpu" and dtype == torch.float32:
            return default_model
        return load_model(spec, device, dtype, log=log)

    def shared_load_tokenizer(path):
        return default_model.tokenizer if path == gguf_path else load_tokenizer(path)

    monkeypatch.setattr(wl, "load_model", shared_load_model)
    monkeypatch.setattr(wl, "load_tokenizer", shared_load_tokenizer)


@pytest.fixture
def gen(capsys):
    """gen(*argv): generate.py's main, in-process (tests/test_cli.py, tests/test_devices.py)."""
    import generate
    from helpers import call
    return lambda *argv: call(generate.main, list(argv), capsys)
