"""Every Triton kernel compiled for a Hopper GPU (sm_90) on a machine without one, and what each
specialization costs in registers and spills: triton.compile lowers a kernel to PTX and the ptxas
inside the triton wheel assembles it; `ptxas -v` reports registers per thread and spill bytes. A
kernel that spills moves its tiles through local memory every iteration, which a memory-bound
decode kernel can least afford; this is how the quant decode kernel's BLOCK_T was chosen.

    python tools/kernel_resources.py      # one row per kernel and specialization

SPECS lists the specializations the engine launches (bfloat16 pointers, each constexpr switch both
ways); tests/test_compile.py compiles all of them. They are compiled as a launch specializes them:
Triton's JIT marks a pointer or an integer argument divisible by 16 (`tt.divisibility`), which lets
it vectorize loads and pipeline them through shared memory (cp.async), and makes an integer equal
to 1 a constant (a contiguous tensor's last stride). So each spec gives its integer arguments as a
Llama-3.1-8B decode at 128k passes them. Without those hints the numbers mislead: the FullKV decode
kernel compiled to 128 registers and no pipelined load, with them to 71 registers and 6 pipelined
loads; the quant decode kernel at BLOCK_T 32 spilled 144 bytes without, none with.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.dense_attn import _dense_decode_kernel, _write_row_kernel  # noqa: E402
from kernels.pack_triton import _quant_channel_kernel, _quant_token_kernel, _unpack_kernel  # noqa: E402
from kernels.norm import _rms_norm_kernel  # noqa: E402
from kernels.prefetch import _gather_rows_kernel  # noqa: E402
from kernels.quant_append import _quant_append_kernel  # noqa: E402
from kernels.quant_attn_triton import _quant_decode_kernel  # noqa: E402
from kernels.rotary import _rope_kernel  # noqa: E402
from kernels.slots import _assign_kernel  # noqa: E402
from kernels.splits import _merge_kernel  # noqa: E402
from kernels.sparse_attn import _approx_scores_kernel  # noqa: E402
from kernels.swiglu import _silu_mul_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BF16, U8, F32, I64 = "*bf16", "*u8", "*fp32", "*i64"
# Llama-3.1-8B at a 128k-token decode: 8 KV heads of 32 query heads, head_dim 128, T cached tokens
# (a capacity), R = 128 (QuantKV's residual), a batch of 1.
H_KV, N_REP, D, T, R = 8, 4, 128, 131072, 128


def strides(prefix: str, *shape: int, last: bool = True) -> dict:
    """The strides of a contiguous tensor of `shape` (B, H, T, D) as the launch names them:
    prefix_b, prefix_h, prefix_t and prefix_d (left out with last=False: kernels that assume 1)."""
    out, step = {}, 1
    for name, n in reversed(list(zip("bhtd", shape))):
        out[f"{prefix}_{name}"] = step
        step *= n
    return out if last else {k: v for k, v in out.items() if not k.endswith("_d")}


def _quant_decode_ints(bits: int, group: int) -> dict:
    """kernels/quant_attn_triton.py's launch: its cache tensors' strides (layout in its docstring)."""
    per, cap = 8 // bits, T + R  # capacity: packed rows + the ring
    split = triton.cdiv(triton.cdiv(cap, 50), 16) * 16  # 50 splits (3 programs on each of 132 SMs), blocks of 16
    held = 1 + T // 100  # QuantKV's defaults: 1 sink + 1% heavy hitters
    shapes = dict(skc=(T, D // per), sks=(T // group, D), skm=(T // group, D), skr=(R, D),
                  svc=(T, D // per), svs=(T, D // group), svm=(T, D // group), svr=(R, D),
                  skh=(held, D), svh=(held, D))  # (rows, row length)
    return dict(n_rep=N_REP, H_kv=H_KV, R=R, split_len=split, S=held,
                s_split=triton.cdiv(triton.cdiv(held, 50), 16) * 16, sq_b=N_REP * H_KV * D, sq_h=D, sq_d=1,
                **{k: v for name, shape in shapes.items() for k, v in strides(name, 1, H_KV, *shape, last=False).items()},
                shm_b=H_KV * T // 8, shm_h=T // 8)


def _specs() -> list[tuple]:
    """(kernel, pointer types, constexprs, compile options) for every launch the engine makes."""
    out = []
    for fp8 in (False, True):
        rng = U8 if fp8 else BF16
        for clip in (False, True):
            ptrs = dict(x_ptr=BF16, codes_ptr=U8, scale_ptr=rng, mn_ptr=rng, sup_ptr=F32 if fp8 else BF16)
            common = dict(D=128, GROUP=32, BITS=2, PER=4, LEVELS=3, CLIP=clip, N_CLIP=13, FP8=fp8)
            search = clip or fp8  # kernels/pack_triton._TILE_SEARCH: 512-element tiles
            for block_t in (1, 4 if search else 32):  # a decode step's rows (one token); prefill tiles
                ints = dict(R=H_KV, T=1) if block_t == 1 else dict(R=H_KV * 16384, T=16384)
                out.append((_quant_token_kernel, ptrs, {**common, "BLOCK_T": block_t, "BLOCK_B": 32},
                            dict(enable_fp_fusion=False), ints))
            out.append((_quant_channel_kernel, ptrs, {**common, "BLOCK_G": 32, "BLOCK_B": 4 if search else 32},
                        dict(enable_fp_fusion=False), dict(T=R)))
    # 4 bits: float ranges, group 64, values clipped (QuantKV's defaults)
    four = dict(D=128, GROUP=64, BITS=4, PER=2, LEVELS=15, N_CLIP=13, FP8=False)
    ptrs = dict(x_ptr=BF16, codes_ptr=U8, scale_ptr=BF16, mn_ptr=BF16, sup_ptr=BF16)
    out.append((_quant_token_kernel, ptrs, {**four, "CLIP": True, "BLOCK_T": 4, "BLOCK_B": 64}, dict(enable_fp_fusion=False),
                dict(R=H_KV * 16384, T=16384)))
    out.append((_quant_channel_kernel, ptrs, {**four, "CLIP": False, "BLOCK_G": 64, "BLOCK_B": 32}, dict(enable_fp_fusion=False),
                dict(T=R)))
    # a decode step's append (QuantKV's defaults: keys and values rotated, values clipped; 4 bits
    # float ranges, 2 bits 8-bit)
    for fp8, cfg, rot_k in ((False, dict(four, CLIP=True), True),
                            (True, dict(D=128, GROUP=32, BITS=2, PER=4, LEVELS=3, CLIP=True, N_CLIP=13, FP8=True), True),
                            (True, dict(D=128, GROUP=32, BITS=1, PER=8, LEVELS=1, CLIP=True, N_CLIP=13, FP8=True), False)):
        rng = U8 if fp8 else BF16  # (the last: 1 bit, values rotated only)
        out.append((_quant_append_kernel, dict(POS=I64, K_NEW=BF16, V_NEW=BF16, K_RES=BF16, V_RES=BF16, V_CODES=U8,
                                               V_SCALE=rng, V_MN=rng, SUP=F32 if fp8 else BF16, ROT=BF16),
                    {**cfg, "PACK": True, "ROT_K": rot_k, "ROT_V": True, "BLOCK_D": 128, "BLOCK_B": 128 // cfg["PER"]},
                    dict(enable_fp_fusion=False),
                    dict(H_kv=H_KV, R=R, N=T - R, skn_b=(N_REP + 2) * H_KV * D, skn_h=D, svn_b=(N_REP + 2) * H_KV * D,
                         svn_h=D)))  # the new rows: views into the QKV output
    for fp8 in (False, True):
        rng = U8 if fp8 else BF16
        for held in (False, True):
            for bits in (2, 4):
                ptrs = dict(Q=BF16, KC=U8, KS=rng, KM=rng, KR=BF16, VC=U8, VS=rng, VM=rng, VR=BF16, HM=U8, KH=BF16,
                            VH=BF16, KSUP=F32, VSUP=F32, ROT=BF16, M_out=F32, L_out=F32, Acc_out=F32, POS=I64)
                g = 32 if fp8 else 64
                out.append((_quant_decode_kernel, ptrs, dict(HAS_HELD=held, FP8=fp8, BITS=bits, G=g, D=D, NREP_PAD=16,
                                                             BLOCK_T=16, ROT_Q=True, ROT_OUT=True, ROT_CHUNK=32),
                            dict(num_warps=4, maxnreg=168), _quant_decode_ints(bits, g)))  # rotated: the default
    out.append((_quant_decode_kernel, ptrs, dict(HAS_HELD=True, FP8=True, BITS=2, G=32, D=D, NREP_PAD=16, BLOCK_T=16,
                                                 ROT_Q=False, ROT_OUT=False, ROT_CHUNK=32), dict(num_warps=4, maxnreg=168),
                _quant_decode_ints(2, 32)))  # rotate="none"
    out.append((_quant_decode_kernel, ptrs, dict(HAS_HELD=True, FP8=True, BITS=1, G=16, D=D, NREP_PAD=16, BLOCK_T=32,
                                                 ROT_Q=True, ROT_OUT=True, ROT_CHUNK=32),
                dict(num_warps=4), _quant_decode_ints(1, 16)))  # key groups smaller than a block; 1 bit
    for per_channel in (False, True):
        out.append((_unpack_kernel, dict(codes_ptr=U8, scale_ptr=BF16, mn_ptr=BF16, out_ptr=BF16),
                    dict(D=128, GROUP=32, BITS=4, PER=2, LEVELS=15, PER_CHANNEL=per_channel, BLOCK_T=32, BLOCK_B=64),
                    dict(enable_fp_fusion=False), dict(R=H_KV * 16384)))
    for kv in (BF16, F32):  # the model's dtype; FullKV's store=float32 under a bfloat16 model
        out.append((_dense_decode_kernel, dict(Q=BF16, K=kv, V=kv, POS=I64, M_out=F32, L_out=F32, Acc_out=F32),
                    dict(D=128, NREP_PAD=16, BLOCK_T=32), dict(num_warps=4),
                    dict(offset=0, n_rep=N_REP, H_kv=H_KV, split_len=2048, sq_b=N_REP * H_KV * D, sq_h=D,  # 64 splits
                         **strides("sk", 1, H_KV, T, D, last=False), **strides("sv", 1, H_KV, T, D, last=False))))
    out.append((_write_row_kernel, dict(K=BF16, V=BF16, KN=BF16, VN=BF16, POS=I64), dict(D=128, BLOCK_D=128), {},
                dict(offset=0, N=T + 64, H_kv=H_KV, **strides("sk", 1, H_KV, T, D, last=False),
                     **strides("sv", 1, H_KV, T, D, last=False), skn_b=(N_REP + 2) * H_KV * D, skn_h=D,
                     svn_b=(N_REP + 2) * H_KV * D, svn_h=D)))  # the new rows: views into the QKV output
    out.append((_rms_norm_kernel, dict(X=BF16, W=BF16, OUT=BF16, eps="fp32"), dict(BLOCK=4096), dict(num_warps=4),
                dict(n_cols=4096, stride_x=4096)))
    out.append((_rope_kernel, dict(H=BF16, COS=BF16, SIN=BF16), dict(HALF=64, HEADS_PAD=64), {},
                dict(T=1, n_heads=N_REP * H_KV + H_KV, s_hb=(N_REP * H_KV + 2 * H_KV) * D, s_ht=(N_REP * H_KV + 2 * H_KV) * D,
                     s_cb=D, s_ct=0)))  # a decode step: one token per sequence, 32 + 8 heads
    out.append((_silu_mul_kernel, dict(GU=BF16, OUT=BF16), dict(BLOCK=1024), dict(num_warps=4),
                dict(n_cols=14336, stride_row=2 * 14336)))  # Llama-3.1-8B's ffn_dim
    for n_splits in (50, 64):  # the quant and FullKV kernels' splits at 128k (8 KV heads, 132 SMs)
        out.append((_merge_kernel, dict(M=F32, L=F32, ACC=F32, OUT=BF16), dict(D=D, SPLITS=64, NREP_PAD=4, BLOCK_D=32),
                    dict(num_warps=4), dict(n_splits=n_splits, n_rep=N_REP)))
    for bounds in (False, True):  # the sketch of single tokens (the default), then of chunks of 16
        N = T // 16 if bounds else T  # 32 channels (the default, head_dim / 4) as 4-bit codes: 16 bytes a row
        out.append((_approx_scores_kernel, dict(q_ptr=BF16, lo_ptr=U8, hi_ptr=U8, base_ptr=F32, step_ptr=F32,
                                                ch_ptr=I64, out_ptr=F32),
                    dict(N_REP=4, HALF=16, BLOCK_M=64, BOUNDS=bounds), {},
                    dict(N=N, H_KV=H_KV, s_qb=N_REP * H_KV * D, s_qh=D, s_sb=H_KV * N * 16, s_sh=N * 16,
                         s_sm=16, s_cb=H_KV * 32, s_ch=32, s_ob=H_KV * N, s_oh=N)))
    for slots, codes, stages in ((False, False, 1), (True, False, 1), (False, True, 1), (False, False, 3),
                                 (True, False, 3), (False, True, 3)):
        src = U8 if codes else BF16  # the host store: 8-bit codes (widened with float32 ranges) or values
        out.append((_gather_rows_kernel, dict(src_k=src, src_v=src, tok_ptr=I64, want_ptr="*i1", slot_ptr=I64,
                                              dst_k=BF16, dst_v=BF16, ks_ptr=F32, km_ptr=F32, vs_ptr=F32, vm_ptr=F32,
                                              count_ptr=I64),  # RowFetcher always counts the rows it copies
                    dict(D=128, BLOCK=32, SLOTS=slots, CODES=codes, COUNT=True, STAGES=stages), {},  # budget 2048: 1968 rows
                    dict(K=1968, M=T, N_DST=2048, offset=16, N_BLK=62, N_ITEMS=H_KV * 62)))
    for chunk in (1, 16):
        for reuse in (False, True):
            out.append((_assign_kernel, dict(slots_ptr=I64, new_ptr=I64, scratch_ptr=I64, rows_ptr=I64, want_ptr="*i8"),
                        dict(CHUNK=chunk, CHUNK_P2=chunk, REUSE=reuse, N_ITER=11, BLOCK=2048 // chunk), {},
                        dict(K=1968 // chunk)))
    # the largest row the slot kernel takes (kernels/slots.py MAX_K): 16 warps, no spills
    out.append((_assign_kernel, dict(slots_ptr=I64, new_ptr=I64, scratch_ptr=I64, rows_ptr=I64, want_ptr="*i8"),
                dict(CHUNK=1, CHUNK_P2=1, REUSE=True, N_ITER=14, BLOCK=8192), dict(num_warps=16), dict(K=8192)))
    return out


SPECS = _specs()


def compile_spec(fn, ptrs: dict, consts: dict, options: dict, ints: dict | None = None):
    """Compile one specialization for sm_90 as a launch with these arguments would: pointers of the
    given types, 16-byte aligned (torch's allocations are), and scalars of a given type ("fp32");
    constexprs by value; sm_scale a float; every other argument a 32-bit int, a constant where
    `ints` gives it as 1 and marked divisible by 16 where it gives a multiple of 16 (integers it
    leaves out carry no hint)."""
    ints = ints or {}
    assert set(ints) <= set(fn.arg_names), f"{fn.__name__} has no argument {set(ints) - set(fn.arg_names)}"
    ones = {a: 1 for a, v in ints.items() if v == 1}
    consts = {**consts, **ones}
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a == "sm_scale" else "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if ptrs.get(a, "").startswith("*") or (a not in ones and a not in ptrs and ints.get(a, 1) % 16 == 0)}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=TARGET, options=options)


def resources(compiled) -> tuple[int, int]:
    """(registers per thread, spill store bytes) of a compiled kernel, from the wheel's `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        ptxas = get_ptxas(TARGET.arch).path
    except TypeError:  # older triton: no arch argument
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs, spill = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    if not regs or not spill:
        raise RuntimeError(f"no resource line in ptxas's output: {log[-300:]}")
    return int(regs.group(1)), int(spill.group(1))


def main() -> None:
    switches = ("FP8", "CLIP", "HAS_HELD", "ROT_Q", "ROT_OUT", "ROT_K", "BITS", "PER_CHANNEL", "BOUNDS", "SLOTS", "CODES", "STAGES", "CHUNK", "REUSE",
                "BLOCK", "BLOCK_T", "BLOCK_B")
    print(f"triton {triton.__version__}, sm_90, registers per thread and spill store bytes\n")
    print("| kernel | specialization | registers | spill bytes |\n|---|---|---|---|")
    for fn, ptrs, consts, options, ints in SPECS:
        regs, spill = resources(compile_spec(fn, ptrs, consts, options, ints))
        label = ", ".join(f"{k}={v}" for k, v in consts.items() if k in switches)
        if fn is _dense_decode_kernel and ptrs["K"] != BF16:  # a cache stored in another dtype than q's
            label += f", cache {ptrs['K'].lstrip('*')}"
        print(f"| {fn.__name__} | {label} | {regs} | {spill} |", flush=True)


if __name__ == "__main__":
    main()
