#!/usr/bin/env bash
# One device call: GPU tests, then the throughput benchmarks. Logs and JSON land in $OUT.
# Usage (on the lent GPU, from the repo root): bash perf/gpu_check.sh [tests|bench|all]
set -uo pipefail
what=${1:-all}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/device.txt"
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -m gpu -q -x tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ $what == bench || $what == all ]]; then
  python3 perf/throughput.py --model qwen3-0.6b --workload nano --no-tqdm --json-out "$OUT/nano_qwen3.json" 2>&1 | tail -4
fi
