"""Devices and memory: --device and --dtype, the --gpu-memory cap, free memory as the up-front
checks see it (CUDA's, and the cap's), weights and caches refused before they are allocated, and
CUDA's out-of-memory errors as one line. The CUDA cases skip without a GPU; the rest fake
torch.cuda or the free memory."""
import pytest

from helpers import assert_clean_error

pytestmark = pytest.mark.usefixtures("reuse_models")


@pytest.mark.parametrize("argv, fragment", [
    (["--gpu-memory", "lots"], "has no unit"),
    (["--gpu-memory", "nanGiB"], "positive and finite"),
    (["--gpu-memory", "infGiB"], "positive and finite"),
    (["--gpu-memory", "0GiB"], "positive and finite"),
    (["--gpu-memory", "24GiB", "--device", "cpu"], "caps a CUDA GPU"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
    (["--kv-budget", "inf", "--policy", "hybrid"], "positive and finite"),
])
def test_memory_flags_checked_before_loading(gen, argv, fragment):
    assert_clean_error(gen("--model", "random:tiny", "--prompt", "hi", *argv), fragment)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA only")
def test_gpu_memory_cap_is_applied(gen):
    assert_clean_error(gen("--model", "random:tiny", "--prompt", "hi", "--gpu-memory", "100000GiB"), "more than the GPU")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA only")
def test_gpu_memory_cap_runs_on_cuda(gen):
    """--device cuda (no index) with a cap: the cap is set and generation runs."""
    import torch
    try:
        ran = gen("--model", "random:tiny", "--prompt", "hi", "--device", "cuda", "--gpu-memory", "4GiB",
                  "--max-new-tokens", "4")
        assert ran.returncode == 0, ran.stderr
        assert torch.cuda.get_per_process_memory_fraction(0) < 1
    finally:  # the cap holds for the whole process: lift it for the tests after this one
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


def test_cuda_without_an_index_gets_one(monkeypatch):
    """torch's per-process memory-fraction calls refuse torch.device("cuda") (no index): resolve_device
    gives 'cuda' the current device's index, and the cap and free-memory helpers index what they
    get. CPU-only: torch.cuda is faked, its fraction calls index the device as torch does."""
    import torch
    from torch.cuda._utils import _get_device_index
    from engine import cli
    seen = []
    for name, fake in [("is_available", lambda: True), ("device_count", lambda: 1), ("current_device", lambda: 0),
                       ("get_device_properties", lambda d: type("P", (), {"total_memory": 80 << 30})),
                       ("set_per_process_memory_fraction", lambda f, d: seen.append(_get_device_index(d))),
                       ("get_per_process_memory_fraction", lambda d: seen.append(_get_device_index(d)) or 0.3),
                       ("mem_get_info", lambda d: (70 << 30, 80 << 30)), ("memory_reserved", lambda d: 1 << 30),
                       ("memory_allocated", lambda d: 1 << 29)]:
        monkeypatch.setattr(torch.cuda, name, fake)
    with pytest.raises(ValueError, match="specified index"):  # what torch does with a bare "cuda"
        _get_device_index(torch.device("cuda"))
    device, _ = cli.resolve_device("cuda", "auto")
    assert device == torch.device("cuda", 0)
    assert cli.cap_gpu_memory("24GiB", torch.device("cuda")) == 24 << 30
    assert cli.free_memory(torch.device("cuda")) == int(0.3 * (80 << 30)) - (1 << 29)  # the cap less what is used
    assert seen == [0, 0]
    # no cap; torch holds 10 GiB, 2 GiB of it in use (a profiling pass's cache freed): 8 GiB are free
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (1 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 10 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 2 << 30)
    assert cli.free_memory(torch.device("cuda")) == 9 << 30


def test_cuda_runtime_out_of_memory_is_one_line(capsys):
    """CUDA's plain RuntimeError "out of memory" (pinning host memory fails, or a graph capture runs
    out) is one line and exit 1, like torch's OutOfMemoryError; other RuntimeErrors still raise."""
    import argparse
    from engine.cli import cli

    def fail(message):
        def run(_):
            raise RuntimeError(message)
        return run
    parser = argparse.ArgumentParser(prog="x.py")
    assert cli(parser, fail("CUDA error: out of memory\nCUDA kernel errors might be ..."), []) == 1
    assert capsys.readouterr().err == "x.py: error: out of memory: CUDA error: out of memory\n"
    with pytest.raises(RuntimeError, match="something else"):
        cli(parser, fail("something else"), [])


@pytest.mark.parametrize("device, fragment", [("meta", "not supported"), ("mps", "not supported"),
                                              ("potato", "unknown device")])
def test_unsupported_devices(gen, device, fragment):
    assert_clean_error(gen("--model", "random:tiny", "--prompt", "hi", "--device", device), fragment)


def test_float16_on_cpu_warns_once(gen):
    ran = gen("--model", "random:tiny", "--prompt", "hi", "--dtype", "float16", "--device", "cpu",
              "--max-new-tokens", "2")
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.count("warning: float16 on CPU is very slow") == 1, ran.stderr


def test_weights_and_caches_that_do_not_fit_are_refused_up_front(gen, monkeypatch):
    """Sizes are compared with the free memory before allocating: a one-line error naming both."""
    import engine.fit
    import weights.hf
    monkeypatch.setattr(weights.hf, "free_memory", lambda device: 10_000)
    ran = gen("--model", "random:tiny", "--prompt", "hi")
    assert_clean_error(ran, "needs 24.3 MiB for its weights as float32; cpu has 9.8 KiB free")
    monkeypatch.undo()
    monkeypatch.setattr(engine.fit, "free_memory", lambda device: 8_000)  # FullKV of 1 + 32 tokens: 8.2 KiB
    assert_clean_error(gen("--model", "random:tiny", "--prompt", "hi"), "the KV cache for 1 + 32 tokens needs 8.2 KiB")
    assert gen("--model", "random:tiny", "--prompt", "hi", "--max-new-tokens", "8").returncode == 0  # 2.2 KiB fits


def test_prefill_that_cannot_run_beside_the_caches_is_refused_up_front(monkeypatch):
    """Each prompt's prefill needs its residual stream, one layer's full K/V and one chunk's activations
    (ModelArgs.prefill_bytes). Sequences prefill one at a time: the second of a batch runs beside
    the first's cache, so a long prompt last needs more than the same prompt first."""
    import engine.api
    import engine.fit
    from engine import LLM
    llm = LLM("random:tiny", "cpu", "float32")
    monkeypatch.setattr(engine.api, "stream_batch", lambda *a, **k: pytest.fail("work started"))
    cache = llm.full_kv_bytes(600 + 4)
    floor = llm.args.prefill_bytes(600, 4)
    assert floor > cache  # so "the caches fit" and "the prefill fits" are different checks here
    monkeypatch.setattr(engine.fit, "free_memory", lambda device: cache + floor - 1)
    with pytest.raises(ValueError, match=r"a prefill beside it need .* at the peak, .* of it the prefill's own"):
        llm.generate([1] * 600, max_new_tokens=4)
    monkeypatch.setattr(engine.fit, "free_memory", lambda device: cache + floor)
    with pytest.raises(pytest.fail.Exception, match="work started"):  # the check passed
        llm.generate([1] * 600, max_new_tokens=4)
    short = llm.full_kv_bytes(10 + 4)
    monkeypatch.setattr(engine.fit, "free_memory", lambda device: short + cache + floor - 1)
    with pytest.raises(pytest.fail.Exception, match="work started"):  # the long prompt first: fits
        llm.generate([[1] * 600, [1] * 10], max_new_tokens=4)
    with pytest.raises(ValueError, match="2 sequences .* and a prefill beside it"):  # last: it does not
        llm.generate([[1] * 10, [1] * 600], max_new_tokens=4)
