#!/usr/bin/env bash
# One integrated round on the GPU machine: every `gpu` test, the selfcheck in bf16, then `python -m matten bench`.
# Usage (device, repo root): MATTEN_COMMIT=<sha> bash benchmarks/device_round.sh
# Optional: .whl/ (diffusers wheels, see the device README) and .peers/mamba_build/selective_scan_cuda.so.xz (mamba-ssm's
# scan extension, built by benchmarks/build_mamba_scan.py) when carried. Writes round.log and the bench files to $OUT.
# BENCH_FIRST=1 runs the bench (BENCH_BUDGET, BENCH_ARGS; BENCH_CASES: model case labels, comma-separated) before
# the tests: timings on an idle machine, the tests after.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
LOG="$OUT/round.log"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if [ -e .peers/mamba_build/selective_scan_cuda.so.xz ]; then
  mkdir -p /tmp/mamba_build && xz -dc .peers/mamba_build/selective_scan_cuda.so.xz > /tmp/mamba_build/selective_scan_cuda.so
  export MATTEN_MAMBA_BUILD=/tmp/mamba_build
fi
run_tests() {
  {
    nvidia-smi -L
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "commit ${MATTEN_COMMIT:-unknown}"
    # GPU tests in groups, run side by side (a fresh machine spends most of the suite compiling Triton kernels, one
    # CPU core per pytest process; three groups in parallel took 168 s where one process ran out of 300 s), each under
    # its own timeout. TEST_GROUPS: groups separated by '|'.
    GROUPS_DEFAULT="tests/test_selective_scan_gpu.py tests/test_launch.py|tests/test_bi_selective_scan.py tests/test_bimamba.py tests/test_conv1d.py tests/test_demo_shapes_gpu.py|tests/test_attention.py tests/test_model.py tests/test_adaln.py tests/test_cuda_graph.py tests/test_train.py|tests/test_cuda_scan.py tests/test_bench_kernels.py"
    IFS='|' read -ra TEST_GROUP_LIST <<< "${TEST_GROUPS:-$GROUPS_DEFAULT}"
    i=0
    for group in "${TEST_GROUP_LIST[@]}"; do
      timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -m gpu $group -p no:cacheprovider --benchmark-disable \
        --durations=5 ${TEST_ARGS:-} > "$OUT/gpu_tests_$i.log" 2>&1 &
      i=$((i + 1))
    done
    wait
    for j in $(seq 0 $((i - 1))); do
      echo "== gpu tests: ${TEST_GROUP_LIST[$j]}"
      tail -12 "$OUT/gpu_tests_$j.log"
    done
    if [ -z "${NO_SELFCHECK:-}" ]; then
      echo "== selfcheck bf16"
      timeout 90 python3 -m matten selfcheck --dtype bfloat16 2>&1 | tail -12
    fi
  } >> "$LOG" 2>&1
  tail -75 "$LOG"
}
run_bench() {
  [ -n "${BENCH_BUDGET:-}" ] || return 0
  echo "== matten bench" | tee -a "$LOG"
  timeout $((BENCH_BUDGET + 60)) python3 -m matten bench ${BENCH_ARGS:-} --out "$OUT" --budget-s "$BENCH_BUDGET" --cases "${BENCH_CASES:-}" 2>&1 \
    | tail -40 | tee -a "$LOG"
}
if [ -n "${BENCH_FIRST:-}" ]; then run_bench; run_tests; else run_tests; run_bench; fi
