"""Which changes to a file would its tests not notice? A small mutation audit.

One operator at a time is swapped in the code of FILE ('<' for '<=', min for max, 'and' for 'or',
'//' for '/', a dropped '- 1' or 'not', True for False...; never inside strings or comments), the
given tests run, and every swap they still pass is printed. Each survivor is either equivalent
(the swap changes nothing observable: a tie, a redundant mask, a CUDA-only branch seen from the
CPU) or behaviour no test pins: a test to write. Run on 2026-11-30 over 50 modules (the README's
Tests section says what it found).

It rewrites FILE in place and restores it after each run, so run it in a spare worktree, where a
killed run leaves nothing to lose (`git checkout FILE` there repairs it):

    git worktree add /tmp/mut HEAD
    .venv/bin/python tools/mutants.py --root /tmp/mut kernels/slots.py tests/test_slots.py tests/test_offloadkv.py
"""
from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tokenize

SWAPS = [("<=", "<"), (">=", ">"), (" < ", " <= "), (" > ", " >= "), (" + 1", ""), (" - 1", ""),
         ("min(", "max("), ("max(", "min("), ("True", "False"), ("False", "True"), (" and ", " or "),
         (" or ", " and "), ("amin", "amax"), ("amax", "amin"), (" // ", " / "), ("not ", "")]


def code_columns(src: str) -> list[set[int]]:
    """Per line, the columns that are code: not inside a string (docstrings included) or a comment."""
    lines = src.split("\n")
    cols: list[set[int]] = [set() for _ in lines]
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        (r0, c0), (r1, c1) = t.start, t.end
        if t.type not in (tokenize.STRING, tokenize.COMMENT) and r0 == r1:
            cols[r0 - 1].update(range(max(0, c0 - 1), c1 + 1))  # the blanks around a token count too
    return cols


def mutants(src: str) -> list[tuple[int, int, str, str]]:
    """(line, column, old, new) for every swap that lies wholly in code."""
    cols = code_columns(src)
    return [(i, m.start(), old, new) for i, line in enumerate(src.split("\n")) for old, new in SWAPS
            for m in re.finditer(re.escape(old), line) if cols[i].issuperset(range(m.start(), m.end()))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="the module to mutate, relative to --root (e.g. kernels/slots.py)")
    ap.add_argument("tests", nargs="+", help="the test files that should notice")
    ap.add_argument("--root", default=".", help="the worktree to run in (default: here)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per test run; a run past it counts as noticed")
    a = ap.parse_args(argv)
    path = f"{a.root}/{a.file}"
    if subprocess.run(["git", "diff", "--quiet", "--", a.file], cwd=a.root).returncode != 0:
        ap.error(f"{a.file} has uncommitted changes in {a.root}: commit them or use a clean worktree")
    src = open(path).read()
    found = mutants(src)
    lines = src.split("\n")
    print(f"{len(found)} mutants in {a.file}", flush=True)
    survivors = 0
    for i, c, old, new in found:
        with open(path, "w") as f:
            f.write("\n".join(lines[:i] + [lines[i][:c] + new + lines[i][c + len(old):]] + lines[i + 1:]))
        try:
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *a.tests],
                                 cwd=a.root, capture_output=True, timeout=a.timeout)
            noticed = run.returncode != 0
        except subprocess.TimeoutExpired:
            noticed = True
        finally:
            with open(path, "w") as f:
                f.write(src)
        if not noticed:
            survivors += 1
            print(f"SURVIVED {a.file}:{i + 1}: {old!r} -> {new!r}: {lines[i].strip()}", flush=True)
    print(f"{survivors} of {len(found)} survived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
