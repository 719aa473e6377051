"""Run a kernel-vs-reference check script under the Triton interpreter.

Triton reads TRITON_INTERPRET when it is imported, and another test may already have imported it in
this process, so each check runs in a fresh interpreter. The script prints "cases failed: N". The
same scripts run compiled on a GPU (check_compiled): they put their tensors on KERNEL_TEST_DEVICE."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, shards: int = 1, **env: str) -> None:
    """Run `script` in a fresh interpreter with `env` set (an empty value removes the variable). With
    shards > 1, that many interpreters run at once, each told its part in CHECK_SHARD ("i/n"; the
    script takes its cases[i::n]) and given one thread: the interpreter runs Python a case at a
    time, so on CI's 2 cores two shards take half the time."""
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    if shards > 1:
        full["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={k: v for k, v in {**full, "CHECK_SHARD": f"{i}/{shards}"}.items() if v})
             for i in range(shards)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert "cases failed: 0" in out, out


def shard_of(cases: list) -> list:
    """This interpreter's part of `cases` (CHECK_SHARD "i/n"; all of them when unset)."""
    i, n = map(int, os.environ.get("CHECK_SHARD", "0/1").split("/"))
    return cases[i::n]


def check_interpreted(script: str, shards: int = 1) -> None:
    _run(script, shards, TRITON_INTERPRET="1", KERNEL_TEST_DEVICE="cpu")


def check_compiled(script: str) -> None:
    """The same script with its tensors on CUDA (KERNEL_TEST_DEVICE) and the kernels compiled: what
    a GPU runs, where rounding can differ from the interpreter's (a contracted multiply-add)."""
    _run(script, TRITON_INTERPRET="", KERNEL_TEST_DEVICE="cuda")


def check_compiled_offline(script: str) -> None:
    """A script that compiles kernels ahead of time for a GPU target (no GPU needed), uninterpreted."""
    _run(script, TRITON_INTERPRET="")
