#!/usr/bin/env bash
# The device session of issue 14, prepared on CPU: one command per call of the `device` tool, each well
# under its 10-minute limit, results under $OUT (copied back) to commit as bench/results/*_<device>.md.
#
#   part 1 (~6 min on an H100): profile of a short batch + ncu at S=512, then the benchmark sections
#       bash bench/gpu_session.sh measure
#   part 2 (~4 min): the tests that use the GPU (kernels, engine, graphs, trainer) on CUDA
#       bash bench/gpu_session.sh test
#
# The device image has torch, triton, transformers, peft and sentence-transformers; quicktok-v1 (the real
# tokenizers) is carried as a wheel in the git-ignored .wheels/ (pip download quicktok-v1 -d .wheels).
set -uo pipefail
OUT=${OUT:-/tmp/jv5fast-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
if ls .wheels/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-index --find-links .wheels quicktok-v1 || true; fi
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || echo "editable install failed (see install.log); gpu_check falls back to the checkout"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/device.txt" 2>&1
case "${1:-measure}" in
measure)
    export JV5FAST_PROFILE_DIR="$OUT/traces"
    timeout 200 $PY bench/gpu_check.py "$OUT/gpu_check_profile.md" --only=profile,ncu 2>&1 | tail -40
    timeout 330 $PY bench/gpu_check.py "$OUT/gpu_check_bench.md" --only=attention,latency,engine,train 2>&1 | tail -60
    ;;
test)
    timeout 540 $PY -m pytest -q -x -p no:cacheprovider tests/kernels tests/train tests/test_engine.py \
        tests/test_engine_triton.py tests/test_graphs.py tests/test_devices.py 2>&1 | tail -40 | tee "$OUT/tests.txt"
    ;;
*)
    echo "usage: bench/gpu_session.sh measure|test"; exit 2 ;;
esac
