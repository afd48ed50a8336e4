#!/usr/bin/env bash
# One integrated round on the GPU machine: every `gpu` test, the selfcheck in bf16, then `python -m matten bench`.
# Usage (device, repo root): MATTEN_COMMIT=<sha> bash benchmarks/device_round.sh
# Optional: .whl/ (diffusers wheels, see the device README) and .peers/mamba_build/selective_scan_cuda.so.xz (mamba-ssm's
# scan extension, built by benchmarks/build_mamba_scan.py) when carried. Writes round.log and the bench files to $OUT.
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
{
  nvidia-smi -L
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${MATTEN_COMMIT:-unknown}"
  echo "== gpu tests"
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu tests -p no:cacheprovider --benchmark-disable \
    --durations=10 ${TEST_ARGS:-} 2>&1 | tail -60
  echo "== selfcheck bf16"
  timeout 90 python3 -m matten selfcheck --dtype bfloat16 2>&1 | tail -12
} > "$LOG" 2>&1
tail -75 "$LOG"
if [ -n "${BENCH_BUDGET:-}" ]; then
  echo "== matten bench" | tee -a "$LOG"
  timeout $((BENCH_BUDGET + 60)) python3 -m matten bench ${BENCH_ARGS:-} --out "$OUT" --budget-s "$BENCH_BUDGET" 2>&1 \
    | tail -40 | tee -a "$LOG"
fi
