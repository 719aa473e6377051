"""Every Triton kernel compiles for a Hopper GPU (sm_90), checked without one: triton.compile lowers
a kernel to PTX and assembles it with the ptxas inside the triton wheel, no driver needed. The
interpreter tests run kernels with Python's semantics and miss what only the compiler rejects: e.g.
code after a `return` inside a constexpr `if` is still compiled, so a branch that is never taken
must still type-check (it did not, once: tensors indexed with the other branch's rank).

The specializations are the ones the engine launches (tools/kernel_resources.SPECS: bfloat16
pointers, every constexpr switch both ways, integers specialized as a Llama-3.1-8B launch's are),
compiled in one subprocess, as the kernel tests run."""
from interpreted import check_compiled_offline

_COMPILE = r"""
import importlib, pkgutil
import kernels
from triton.runtime.jit import JITFunction
from tools.kernel_resources import SPECS, compile_spec

# every kernel in kernels/ (a jit function named *_kernel; helpers are compiled inside them)
modules = [importlib.import_module(f"kernels.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]
every = {v.__name__ for m in modules for v in vars(m).values() if isinstance(v, JITFunction) and v.__name__.endswith("_kernel")}
missing = every - {fn.__name__ for fn, *_ in SPECS}
if missing:
    print(f"FAIL kernels without a specialization in tools/kernel_resources.SPECS: {sorted(missing)}")

failed = 0
for fn, ptrs, consts, options, ints in SPECS:
    try:
        compile_spec(fn, ptrs, consts, options, ints)
    except Exception as e:  # one line per failure: where (the outer error) and why (the innermost cause)
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        print(f"FAIL {fn.__name__} {consts}: {str(e).strip().splitlines()[0]} {type(cause).__name__}: {cause}")
        failed += 1
print(f"{len(SPECS)} specializations of {len(every)} kernels compiled, cases failed: {failed + bool(missing)}")
"""


def test_every_kernel_compiles_for_hopper():
    check_compiled_offline(_COMPILE)
