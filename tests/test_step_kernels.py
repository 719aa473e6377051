"""tools/step_kernels.py: the kernels a decode step launches per layer on a GPU (counted on CPU with
the interpreted Triton kernels). Each is a CUDA-graph node costing microseconds however little it
computes, so a change that adds one to every layer should be a decision, not an accident: these
are today's counts as upper bounds."""
from interpreted import check_interpreted

COUNT_CHECK = r"""
from tools.step_kernels import step_counts
from engine.kv import parse_policy
bad = 0
# norm, QKV matmul, RoPE, row write, attention, split merge, Wo (+ residual), norm, gate/up matmul,
# silu * up, down (+ residual); QuantKV: its append instead of the row write (the query's and the
# output's rotations are inside its attention kernel); OffloadKV: chunk scores, top-k, sort, slot
# assignment, the gather
for text, most in [("full", 11), ("quant", 11), ("offload:budget=96,recent=16,chunk=4", 16)]:
    spec = parse_policy(text)
    one, two = step_counts(spec, 1, prompt=128), step_counts(spec, 2, prompt=128)
    n = sum((two - one).values())
    if n > most or n < 8:
        bad += 1
        print("COUNT", text, n, "kernels per layer, expected at most", most, dict(two - one))
print("cases failed:", bad)
"""


def test_decode_step_kernels_per_layer():
    check_interpreted(COUNT_CHECK)
