"""Every Triton kernel compiles for a Hopper GPU (sm_90), checked without one: triton.compile lowers
a kernel to PTX and assembles it with the ptxas inside the triton wheel, no driver needed. The
interpreter tests run kernels with Python's semantics and miss what only the compiler rejects: e.g.
code after a `return` inside a constexpr `if` is still compiled, so a branch that is never taken
must still type-check (it did not, once: tensors indexed with the other branch's rank).

Each kernel is compiled in the specializations the engine launches (pointer element types as on a
bfloat16 GPU; every constexpr switch both ways), one subprocess for all, as the kernel tests do."""
from interpreted import check_compiled_offline

_COMPILE = r"""
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from kernels.dense_attn import _dense_decode_kernel
from kernels.pack import _quant_channel_kernel, _quant_token_kernel, _unpack_kernel
from kernels.prefetch import _gather_rows_kernel
from kernels.quant_attn import _quant_decode_kernel
from kernels.slots import _assign_kernel
from kernels.sparse_attn import _approx_scores_kernel

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"sm_scale"}

def compile_one(fn, ptrs, consts, **options):
    # pointers as given, constexprs by value, sm_scale float, every other argument a 32-bit int
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a in FLOATS else "i32") for a in fn.arg_names}
    try:
        triton.compile(ASTSource(fn, sig, constexprs=consts), target=TARGET, options=options)
        return 0
    except Exception as e:  # one line per failure: where (the outer error) and why (the innermost cause)
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        print(f"FAIL {fn.__name__} {consts}: {str(e).strip().splitlines()[0]} {type(cause).__name__}: {cause}")
        return 1

bf16, u8, f32, i64, i8 = "*bf16", "*u8", "*fp32", "*i64", "*i8"
failed = n = 0
for fp8 in (False, True):
    for clip in (False, True):
        rng = u8 if fp8 else bf16
        common = dict(D=128, GROUP=32, BITS=2, PER=4, LEVELS=3, CLIP=clip, N_CLIP=13, FP8=fp8)
        ptrs = dict(x_ptr=bf16, codes_ptr=u8, scale_ptr=rng, mn_ptr=rng, sup_ptr=f32 if fp8 else bf16)
        failed += compile_one(_quant_token_kernel, ptrs, {**common, "BLOCK_T": 1, "BLOCK_B": 32}, enable_fp_fusion=False)
        failed += compile_one(_quant_channel_kernel, ptrs, {**common, "BLOCK_G": 32, "BLOCK_B": 32}, enable_fp_fusion=False)
        n += 2
for per_channel in (False, True):
    failed += compile_one(_unpack_kernel, dict(codes_ptr=u8, scale_ptr=bf16, mn_ptr=bf16, out_ptr=bf16),
                          dict(D=128, GROUP=32, BITS=4, PER=2, LEVELS=15, PER_CHANNEL=per_channel, BLOCK_T=32, BLOCK_B=64),
                          enable_fp_fusion=False)
    n += 1
for fp8 in (False, True):
    for held in (False, True):
        rng = u8 if fp8 else bf16
        ptrs = dict(Q=bf16, KC=u8, KS=rng, KM=rng, KR=bf16, VC=u8, VS=rng, VM=rng, VR=bf16, HM=u8, KSUP=f32,
                    VSUP=f32, M_out=f32, L_out=f32, Acc_out=f32, POS=i64)
        failed += compile_one(_quant_decode_kernel, ptrs, dict(HAS_HELD=held, FP8=fp8, BITS=2, G=32, D=128,
                                                               NREP_PAD=16, BLOCK_T=32), num_warps=4)
        n += 1
failed += compile_one(_dense_decode_kernel, dict(Q=bf16, K=bf16, V=bf16, LEN=i64, M_out=f32, L_out=f32, Acc_out=f32),
                      dict(D=128, NREP_PAD=16, BLOCK_T=64), num_warps=4)
n += 1
for bounds in (False, True):
    failed += compile_one(_approx_scores_kernel, dict(q_ptr=bf16, mn_ptr=bf16, mx_ptr=bf16, ch_ptr=i64, out_ptr=f32),
                          dict(N_REP=4, C=8, BLOCK_M=128, BOUNDS=bounds))
    n += 1
for slots in (False, True):
    failed += compile_one(_gather_rows_kernel, dict(src_k=bf16, src_v=bf16, tok_ptr=i64, want_ptr="*i1", slot_ptr=i64,
                                                    dst_k=bf16, dst_v=bf16), dict(D=128, BLOCK=32, SLOTS=slots))
    n += 1
for chunk in (1, 16):
    for reuse in (False, True):
        failed += compile_one(_assign_kernel, dict(slots_ptr=i64, new_ptr=i64, scratch_ptr=i64, rows_ptr=i64, want_ptr=i8),
                              dict(CHUNK=chunk, CHUNK_P2=chunk, REUSE=reuse, N_ITER=11, BLOCK=2048 // chunk))
        n += 1
assert n == 23, f"{n} compiled, not 23"
print(f"{n} kernels compiled, cases failed: {failed}")
"""


def test_every_kernel_compiles_for_hopper():
    check_compiled_offline(_COMPILE)
