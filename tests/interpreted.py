"""Run a kernel-vs-reference check script under the Triton interpreter.

Triton reads TRITON_INTERPRET when it is imported, and another test may already have imported it in
this process, so each check runs in a fresh interpreter. The script prints "cases failed: N". The
same scripts run compiled on a GPU (check_compiled): they put their tensors on KERNEL_TEST_DEVICE."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, **env: str) -> None:
    """Run `script` in a fresh interpreter with `env` set (an empty value removes the variable)."""
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={k: v for k, v in full.items() if v}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cases failed: 0" in proc.stdout, proc.stdout


def check_interpreted(script: str) -> None:
    _run(script, TRITON_INTERPRET="1", KERNEL_TEST_DEVICE="cpu")


def check_compiled(script: str) -> None:
    """The same script with its tensors on CUDA (KERNEL_TEST_DEVICE) and the kernels compiled: what
    a GPU runs, where rounding can differ from the interpreter's (a contracted multiply-add)."""
    _run(script, TRITON_INTERPRET="", KERNEL_TEST_DEVICE="cuda")


def check_compiled_offline(script: str) -> None:
    """A script that compiles kernels ahead of time for a GPU target (no GPU needed), uninterpreted."""
    _run(script, TRITON_INTERPRET="")
