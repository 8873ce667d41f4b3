#!/usr/bin/env bash
# One short GPU check, run from the repository root on a CUDA machine: the GPU tests, the kernel
# benchmarks and the pipeline benchmark (full-size SD-1.5 architecture, RANDOM weights, 512x512), each
# under its own time limit so that one hang cannot eat the rest. Logs and result JSON go to $OUT
# (default ./gpu-check-<date>); a summary table is printed last.
#
# Offline machines: put wheels of what is missing (diffusers, importlib_metadata) in .whl/ first; they
# are installed into /tmp/site. The package itself runs from the checkout (PYTHONPATH), no install.
# Optional: GPU_CHECK_BACKENDS (default baseline,torch), GPU_CHECK_RUNS (default 5).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed"; exit 2; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 REGIONDRAG_CACHE="${REGIONDRAG_CACHE:-/tmp/regiondrag-gpu-check}"
unset TRITON_INTERPRET
declare -A STATUS

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, record the exit status
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  STATUS[$name]="rc=$rc $((SECONDS - t0))s"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; "$PY" -m regiondrag.engine info; } \
  2>&1 | tee "$OUT/env.log"
# The full-size compiled/ORT equivalence test builds AOTInductor packages for minutes: left to a longer run.
step pytest_gpu "${GPU_CHECK_PYTEST_S:-150}" "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider tests \
  -k "not test_fp16_full_size_edit_matches_torch"
step bench_kernels 60 "$PY" benchmarks/bench_kernels.py --out "$OUT/kernels.json"
step bench_attention 60 "$PY" benchmarks/bench_attention.py --out "$OUT/attention.json"
step bench_pipeline "${GPU_CHECK_BENCH_S:-240}" "$PY" -m regiondrag.engine bench --model random-sd15 \
  --backends "${GPU_CHECK_BACKENDS:-baseline,torch}" --workloads default --runs "${GPU_CHECK_RUNS:-5}" --warmup 2 \
  --out "$OUT/bench.json" --no-chart

echo
echo "| step | result |"
echo "|---|---|"
for name in pytest_gpu bench_kernels bench_attention bench_pipeline; do
  echo "| $name | ${STATUS[$name]:-not run} |"
done
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" | tail -1
