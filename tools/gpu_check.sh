#!/usr/bin/env bash
# Issue 11's GPU checks as one prepared run, for a session that is lent a GPU for a few minutes:
# each step runs under its own time limit, in the order given, and a failed or timed-out step does
# not stop the next. Everything goes to $OUT/gpu_check.log (plus the bench JSON files), so what a
# step printed comes back even when the whole command is cut short.
#
#   bash tools/gpu_check.sh tests capped    # the first run: 7.5 minutes at most (timeout_s 470)
#   bash tools/gpu_check.sh full kernels    # the second, at once: 5 minutes at most (timeout_s 320)
#   bash tools/gpu_check.sh prefill offload # the third, if device time is left: 275 s (timeout_s 290)
#   bash tools/gpu_check.sh overlap         # if device time is still left: 90 s
#   bash tools/gpu_check.sh capped20        # likewise: 200 s
# The limits are ceilings: 15 minutes of device time (the machine's start included) hold the first
# two calls at their limits, and the third if the first two end early, as they should. Before the
# call that runs `full`, run tools/peer_wheels.sh here and pass carry=[".whl"]: without it the
# kvpress rows say "not installed" and transformers is the image's own.
#
# Steps (limits in seconds, first-launch kernel compiles included; random:llama-3.1-8b in
# bfloat16, 128k-token prompts):
#   tests   180  the CUDA-only tests in two parts, 75 + 105: compiled kernels vs references (bfloat16
#                included, which the interpreter cannot check); then graph replay vs eager and vs the
#                CPU path for every policy (float32, and bfloat16 vs float32), the zero-copy fetch,
#                chunked prefill, the memory cap
#   capped  270  bench.py under --gpu-memory 24GiB: QuantKV 4/2-bit, OffloadKV budget 2048,
#                BudgetedEvictKV and the hybrid at 10%, the TailorKV-shaped plan (decode ms/token,
#                peak GPU memory: does it fit a 24 GB card; the JSON's peak_estimate_bytes beside
#                it is what the up-front check expected)
#   capped20 200  the same cap at 20%: OffloadKV, BudgetedEvictKV and the hybrid (not in the default list)
#   full    200  FullKV uncapped at 128k, the ms/token baseline (it cannot fit 24 GiB), and in the same
#                run the peers at 10%: transformers' DynamicCache and kvpress's presses (wheels from
#                .whl/, installed to /tmp/peer_site; PyramidKV last: ~1.5 s/token at 128k on the H100).
#                transformers' QuantizedCache is left out: quanto compiles its CUDA extension (minutes)
#   kernels 100  tools/kernel_timing.py: the fused slot-assignment and 8-bit-range quantize kernels,
#                and the decode step's per-layer small ops (norm, RoPE, silu * up, split merge, row
#                write, QuantKV append), against the torch code they replace, per call in a CUDA
#                graph; one layer's
#                zero-copy gather beside one layer's weight GEMVs, the copy on 4-32 programs or all;
#                decode attention at 128k (FullKV, QuantKV 4/2-bit) as GB/s per BLOCK_T and split count
#   prefill  90  tools/prefill_memory.py on the GPU: one layer's prefill at 32k and 128k per policy, the
#                allocator's peak against ModelArgs.prefill_bytes (what the up-front check adds to the caches)
#   offload 185  tools/offload_gpu.py at 128k: chunk sizes 1 and 16, host store bfloat16 or 8-bit,
#                copy/selection kernel times (9 rows, each its own 128k prefill: ~15-17 s a row)
#   overlap  90  tools/offload_gpu.py at 32k, chunk 16, lookahead layer and step, the overlapped copy
#                on all SMs, 8 or 32 programs, and with the side stream off (not in the default list)
#   throughput 200  bench.py --throughput at 32k under 24 GiB (not in the default list)
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODEL=(--model random:llama-3.1-8b --device cuda --dtype bfloat16)
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 6")  # pytest-xdist, if the image has it

step() {  # step NAME LIMIT COMMAND...: run it under `timeout`, its output appended to the log
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    start=$(date +%s)
    timeout -k 15 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s$([ $rc = 124 ] && echo ' (timed out)')" | tee -a "$LOG"
}

peer_path() {  # the peers' wheels (tools/peer_wheels.sh), when carried, installed once beside the
    # image's packages -> PYTHONPATH=that folder, for the `full` step alone (transformers 5.2 there)
    if ls .whl/*.whl >/dev/null 2>&1 && { [ -d /tmp/peer_site ] || "$PY" -m pip install -q --no-index --no-deps \
        --no-compile --no-cache-dir --target /tmp/peer_site .whl/*.whl >>"$LOG" 2>&1; }; then
        echo PYTHONPATH=/tmp/peer_site
    fi
}

run() {
    case $1 in
    # kernels against their references, then whole decode paths, each under its own limit: one
    # running long does not cut the other short
    # The kernel checks compile every specialization cold (~105 s of compiling on one core, estimated):
    # 6 workers when the image has pytest-xdist. The decode paths stay serial: one times an overlap.
    tests) step tests-kernels 75 "$PY" -m pytest -v -rs -p no:cacheprovider $XDIST tests/test_pack.py tests/test_fp8.py \
        tests/test_quant_attn.py tests/test_dense_attn.py tests/test_splits.py tests/test_norm.py \
        tests/test_rotary.py tests/test_swiglu.py tests/test_quant_append.py -k "cuda or compiled or gpu"
        step tests-paths 105 "$PY" -m pytest -v -rs -p no:cacheprovider tests/test_graphs.py \
        tests/test_offloadkv.py tests/test_prefetch.py tests/test_prefill_chunks.py tests/test_devices.py \
        -k "cuda or compiled or gpu" ;;
    capped) step capped 270 "$PY" bench.py "${MODEL[@]}" --ctx 128k --gpu-memory 24GiB --kv-fraction 0.1 \
        --policies quant,quant:bits=2,offload:budget=2048,evict,hybrid,plan:docs/plans/tailorkv_shape_random8b.json \
        --peers none --no-quality --steps 16 --json "$OUT/capped_128k.json" ;;
    capped20) step capped20 200 "$PY" bench.py "${MODEL[@]}" --ctx 128k --gpu-memory 24GiB --kv-fraction 0.2 \
        --policies offload,evict,hybrid --peers none --no-quality --steps 16 --json "$OUT/capped_128k_20.json" ;;
    full) step full 200 env $(peer_path) "$PY" bench.py "${MODEL[@]}" --ctx 128k \
        --policies full --kv-fraction 0.1 --no-quality --steps 16 --json "$OUT/full_128k.json" --peers \
        hf-dynamic,kvpress-snapkv,kvpress-streamingllm,kvpress-tova,kvpress-knorm,kvpress-adakv,kvpress-pyramidkv ;;
    kernels) step kernels 100 "$PY" tools/kernel_timing.py ;;
    prefill) step prefill 90 "$PY" tools/prefill_memory.py --device cuda --tokens 32k,128k ;;
    offload) step offload 185 "$PY" tools/offload_gpu.py --ctx 128k --budget 2048 --chunks 1,16 --host model,8bit ;;
    overlap) step overlap 90 "$PY" tools/offload_gpu.py --ctx 32k --budget 2048 --chunks 16 --lookahead layer,step \
        --copy-programs 0,8,32 --overlap-off ;;
    throughput) step throughput 200 "$PY" bench.py "${MODEL[@]}" --throughput --ctx 32k --gpu-memory 24GiB \
        --policies full,evict,offload,hybrid --json "$OUT/throughput_32k.json" ;;
    *) echo "unknown step $1 (tests, capped, capped20, full, kernels, prefill, offload, overlap, throughput)" | tee -a "$LOG" ;;
    esac
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >>"$LOG" 2>&1
for s in "${@:-tests capped full kernels offload}"; do
    for one in $s; do run "$one"; done
done
