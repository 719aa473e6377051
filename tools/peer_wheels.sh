#!/usr/bin/env bash
# The peers' packages as wheels for the GPU machine (Python 3.12, x86-64, no internet), so that
# `tools/gpu_check.sh full` can measure transformers' DynamicCache and kvpress's presses beside our
# FullKV in one bench run. Run it here, where pip reaches PyPI; it fills .whl/ (git-ignored), and the
# device call carries it: run(command="bash tools/gpu_check.sh ...", carry=[".whl"]).
#
# Why these and not `pip install -r requirements-peers.txt`: the GPU image already holds torch 2.11,
# transformers 5.17, accelerate, peft, pandas, pyarrow, six and the rest, but kvpress 0.5.5 needs
# transformers < 5.3, and transformers 5.2 refuses at import the image's tokenizers 0.23.2 (it
# wants <= 0.23.0). `import kvpress` imports every press, and two of them import datasets, fire and
# cachetools. So the set is: transformers 5.2 + tokenizers 0.22.2, kvpress and the four packages the
# image lacks (fire 0.6.0 ships only as source: built into a wheel here). Checked on CPU on
# 2026-11-29: these installed with --target over torch 2.13, transformers 5.17, tokenizers 0.23.2
# and huggingface_hub 1.33 (the image's versions), then bench.py --peers transformers,kvpress ran
# every peer on random:tiny. About 15 MB; the device call's tree may be 64 MiB.
#
# optimum-quanto (transformers' QuantizedCache) is fetched too, but gpu_check.sh leaves the hf-quanto
# peers out by default: quanto's CUDA unpack builds its whole C++/CUDA extension (AWQ and Marlin
# kernels) with nvcc on first use, minutes of a 15-minute GPU session.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=.whl
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" transformers==5.2.0 tokenizers==0.22.2 kvpress==0.5.5 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19 cachetools==5.5.2 termcolor==3.3.0 optimum-quanto==0.2.7
"$PY" -m pip wheel -q --no-deps -w "$DEST" fire==0.6.0
ls -1 "$DEST"
du -sh "$DEST"
