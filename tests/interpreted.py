"""Run a kernel-vs-reference check script under the Triton interpreter.

Triton reads TRITON_INTERPRET when it is imported, and another test may already have imported it in
this process, so each check runs in a fresh interpreter. The script prints "cases failed: N"."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_interpreted(script: str) -> None:
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1",
                               "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cases failed: 0" in proc.stdout, proc.stdout
