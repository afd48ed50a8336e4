#!/usr/bin/env bash
# One device round for the selective scan: GPU tests, (optionally) build mamba-ssm's extension in parallel, benchmarks.
# Usage (device): MATTEN_COMMIT=<sha> bash benchmarks/device_scan_round.sh [mamba_src_dir] [prebuilt_dir]
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
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -x tests/test_selective_scan_gpu.py -p no:cacheprovider --durations=5 -k "${TEST_K:-not nothing}" 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
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
