#!/usr/bin/env bash
# One device round for the selective scan: GPU tests, (optionally) build mamba-ssm's extension in parallel, benchmarks.
# Usage (device): MATTEN_COMMIT=<sha> bash benchmarks/device_scan_round.sh [mamba_src_dir] [prebuilt_dir]
# e.g. session 32's unfinished check: TEST_FILES="tests/test_selective_scan_gpu.py tests/test_bi_selective_scan.py"
#   TEST_K="lanes_backward or (bi_dtypes and lanes) or large_delta" TEST_WORKERS=12 TEST_TIMEOUT=400
# Writes logs and result JSON under $OUT (or ./out).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
MAMBA_SRC=${1:-}; MAMBA_BUILD=${2:-/tmp/mamba_build}
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ -e .peers/mamba_build/selective_scan_cuda.so.xz ] && [ ! -e "$MAMBA_BUILD/selective_scan_cuda.so" ]; then
  mkdir -p "$MAMBA_BUILD" && xz -d -c .peers/mamba_build/selective_scan_cuda.so.xz > "$MAMBA_BUILD/selective_scan_cuda.so"
fi
if [ -n "$MAMBA_SRC" ] && [ ! -e "$MAMBA_BUILD/selective_scan_cuda.so" ]; then
  (timeout 240 python3 benchmarks/build_mamba_scan.py "$MAMBA_SRC" "$MAMBA_BUILD" 90 > "$OUT/mamba_build.log" 2>&1; echo "build rc $?" >> "$OUT/mamba_build.log") &
  BUILD_PID=$!
fi
# TEST_FILES (default the uni GPU tests), TEST_K, TEST_WORKERS (pytest-xdist processes; a cold machine spends most
# of the time compiling, one core a process), TEST_TIMEOUT
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -x -m gpu ${TEST_FILES:-tests/test_selective_scan_gpu.py} \
  ${TEST_WORKERS:+-n $TEST_WORKERS} -p no:cacheprovider --durations=5 -k "${TEST_K:-not nothing}" 2>&1 | tail -25 \
  | tee "$OUT/gpu_tests.log"
if [ -n "${BUILD_PID:-}" ]; then
  wait $BUILD_PID; tail -3 "$OUT/mamba_build.log"
  # bring the module back (<= 16 MiB a file) so later rounds can skip the build
  so=$(ls "$MAMBA_BUILD"/selective_scan_cuda*.so 2>/dev/null | head -1)
  [ -n "$so" ] && xz -T8 -6 -c "$so" > "$OUT/selective_scan_cuda.so.xz" && ls -la "$so" "$OUT/selective_scan_cuda.so.xz"
fi
if [ -n "${SWEEP:-}" ]; then
  timeout ${SWEEP_TIMEOUT:-120} python3 benchmarks/bench_selective_scan.py --sweep --shapes "$SWEEP" --commit "${MATTEN_COMMIT:-unknown}" --out "$OUT" 2>&1 | tail -32 | tee "$OUT/sweep.log"
fi
timeout ${BENCH_TIMEOUT:-150} python3 benchmarks/bench_selective_scan.py --dtypes ${BENCH_DTYPES:-bf16,fp32} --mamba-build "$MAMBA_BUILD" --commit "${MATTEN_COMMIT:-unknown}" --out "$OUT" 2>&1 | tail -25 | tee "$OUT/bench_scan.log"
timeout ${BI_TIMEOUT:-120} python3 benchmarks/bench_bidirectional.py --mamba-build "$MAMBA_BUILD" --commit "${MATTEN_COMMIT:-unknown}" --out "$OUT" 2>&1 | tail -22 | tee "$OUT/bench_bi.log"
