#!/bin/sh
# sh tests/tools/perf_analyzer.sh [PYTHON]: install Triton's perf_analyzer into .perf_analyzer/.
#
# The package index's perf-analyzer is an empty placeholder; the tritonclient 2.41.0 wheel
# ships the binary, installed as the venv's bin/perf_analyzer. It is linked against libb64 (Debian's
# libb64-0d) and libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel) even against a CPU
# server. It lives in a venv of its own because it pins an older tritonclient.
# Prints the command that runs it: env LD_LIBRARY_PATH=<the cudart wheel> .perf_analyzer/bin/perf_analyzer.
set -eu
PYTHON=${1:-python3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=$ROOT/.perf_analyzer
if [ ! -f "$VENV/.installed" ]; then
    if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
        apt-get update -q >&2 && apt-get install -y -q libb64-0d >&2
    fi
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "tritonclient[all]==2.41.0" nvidia-cuda-runtime-cu12 >&2
    touch "$VENV/.installed"
fi
CUDART=$("$VENV/bin/python" -c 'import os, nvidia.cuda_runtime; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], "lib"))')
echo "env LD_LIBRARY_PATH=$CUDART $VENV/bin/perf_analyzer"
