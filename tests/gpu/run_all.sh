#!/usr/bin/env bash
# Every GPU test and kernel benchmark, for a machine with a CUDA GPU (the H200
# some tasks are lent).  Under 8 minutes there: build the CUDA C++ kernels, run
# the tests marked cuda, then the GPU kernel and copy/compute overlap benchmarks.  Results also go to
# $OUT (when set) as gpu-tests.txt and gpu-bench.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
# The project's venv where there is one; else the machine's python3 (a GPU machine
# often comes with torch and Triton installed; the repo root is on sys.path).
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-artifacts/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -m kernels.build | tee "$OUT/build.txt"
"$PY" -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt"
"$PY" -m pytest -q tests/bench/bench_kernels_gpu.py tests/bench/bench_overlap_gpu.py -o python_files='bench_*.py' -s \
    -p no:cacheprovider 2>&1 | tee "$OUT/gpu-bench.txt"
