"""How many kernels one decode step launches per layer on a GPU, by KV policy, counted on a CPU.

A graphed decode step replays one CUDA-graph node per kernel, and each node costs microseconds
however little it computes (tools/kernel_timing.py times the small ones), so the count per layer
is a cost of its own next to the bytes a step reads. This tool runs one decode step of a small
random model the way a GPU runs it (LAYERKV_KERNELS=triton: the Triton kernels, interpreted on
CPU tensors) and counts every torch op that launches work (views and allocations excluded) and
every Triton launch; one-per-step work (embedding, RoPE angles, the output head) is split off by
counting a one-layer and a two-layer model.

    python tools/step_kernels.py                     # full, quant, offload, evict
    python tools/step_kernels.py --policies quant:bits=2 offload:budget=256,lookahead=step

Caveat: a torch op is counted as one kernel; on a GPU some launch more than one (topk, sort).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ["LAYERKV_KERNELS"] = "triton"

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import preset  # noqa: E402
from engine.kv import build_policies, parse_policy  # noqa: E402
from engine.model import Llama  # noqa: E402

# ops that launch nothing: views, aliasing, allocation (torch.empty allocates from the graph's pool)
NO_KERNEL = {"view", "_unsafe_view", "transpose", "t", "expand", "slice", "select", "split", "split_with_sizes",
             "chunk", "unsqueeze", "squeeze", "permute", "as_strided", "alias", "detach", "detach_", "unbind",
             "reshape", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
             "numpy_T"}


class KernelCounter(TorchDispatchMode):
    """Counts kernel-launching torch ops, and Triton launches by kernel name; what a Triton kernel
    does inside the interpreter is not counted."""

    def __init__(self):
        super().__init__()
        self.counts, self._inside = collections.Counter(), 0

    def __enter__(self):
        run = self._run = interpreter.InterpretedFunction.run
        counter = self

        def counted(fn, *args, **kwargs):
            if not counter._inside:
                counter.counts["triton " + fn.fn.__name__] += 1
            counter._inside += 1
            try:
                return run(fn, *args, **kwargs)
            finally:
                counter._inside -= 1
        interpreter.InterpretedFunction.run = counted
        return super().__enter__()

    def __exit__(self, *exc):
        interpreter.InterpretedFunction.run = self._run
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        # a cast to the dtype a tensor has is no kernel: dispatch still shows it as `to`
        if not self._inside and name not in NO_KERNEL and not (name == "to" and out is args[0]):
            self.counts[name] += 1
        return out


def step_counts(spec: dict, n_layers: int, prompt: int = 512) -> collections.Counter:
    """Kernels of one decode step (after a prompt of `prompt` tokens) of a random model with
    `n_layers` layers, head_dim 64 (the Triton kernels' smallest common case), every layer `spec`."""
    args = preset("tiny", dim=256, n_heads=4, n_kv_heads=2, n_layers=n_layers)
    model = Llama.random(args, "cpu", torch.float32)
    tokens = torch.randint(0, 1000, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        policies = build_policies(args, spec, prompt + 8, "cpu", torch.float32)
        model.prefill(tokens, policies)
        for _ in range(2):  # the second step is the steady state (a first step fills OffloadKV's slots)
            pos = torch.tensor([policies[0].length])
            for p in policies:
                p.before_step()
            with KernelCounter() as counter:
                model.decode_step(torch.tensor([5]), pos, [policies])
    return counter.counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", default=["full", "quant", "offload:budget=256", "evict:budget=256"],
                   help="policy specs as generate.py takes them, e.g. quant:bits=2 (default: the four, small budgets)")
    a = p.parse_args()
    print("| policy | kernels per layer | per step besides | per layer, by op |\n|---|---|---|---|")
    for text in a.policies:
        try:
            spec = parse_policy(text)
        except ValueError as e:
            p.error(str(e))
        one, two = step_counts(spec, 1), step_counts(spec, 2)
        layer = two - one  # Counter subtraction: what the second layer added
        per_step = one - layer
        ops = ", ".join(f"{name} {n}" for name, n in layer.most_common())
        print(f"| {text} | {sum(layer.values())} | {sum(per_step.values())} | {ops} |", flush=True)


if __name__ == "__main__":
    main()
