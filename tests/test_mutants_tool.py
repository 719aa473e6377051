"""tools/mutants.py: swaps land in code only, never in strings or comments."""
from tools.mutants import mutants


def test_swaps_only_code():
    src = 'if a < b and not c:  # a < b\n    s = "x < y" if d >= 1 else min(e, f)\n'
    found = {(line, col, old, new) for line, col, old, new in mutants(src)}
    assert found == {(0, 4, " < ", " <= "), (0, 8, " and ", " or "), (0, 13, "not ", ""),
                     (1, 21, ">=", ">"), (1, 31, "min(", "max(")}  # none in the string or the comment
