#!/usr/bin/env bash
# Everything a short GPU lease should measure, in order of importance, each part under its own time limit so that a
# slow part cannot starve the rest, and each writing into OUT as it goes (a stopped run keeps what it measured):
#   1. the GPU check (scripts/gpu_check.sh): the headline table against diffusers, batches 1, 4, 8;
#   2. the profile of one guided pass, ours against ours-with-the-module-attention against diffusers;
#   3. the GPU tests (-m gpu);
#   4. compiled blocks + CUDA graphs, batches 1 and 4.
# About 9 minutes on an H200; give it a device call of 10. Usage: OUT=dir bash scripts/gpu_session.sh
# Settings (environment): OUT (bench/), PYTHON (python3), MODEL (random-big), SIZE (1024), and T1..T4, each part's
# limit in seconds (240, 90, 60, 150). On a CPU, MODEL=tiny SIZE=256 proves the script (the profile part then runs on
# the CPU in fp32, and the GPU tests skip).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench} PYTHONUNBUFFERED=1 PYTHONPATH=.
PY=${PYTHON:-python3}
mkdir -p "$OUT"
part() {  # part NAME LIMIT COMMAND...: run one part, log to OUT/NAME.log, print its tail and exit status
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? (limit ${limit}s)"
  tail -n 6 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
part check "${T1:-240}" env BATCHES="1 4 8" PYTHON="$PY" bash scripts/gpu_check.sh
part profile "${T2:-90}" "$PY" scripts/profile_stages.py --model "${MODEL:-random-big}" --size "${SIZE:-1024}" \
  --batch 1 4 --top 6 --variants ours mha diffusers --json "$OUT/profile.json"
part gputests "${T3:-60}" "$PY" -m pytest -p no:cacheprovider -q -m gpu tests/test_gdf.py tests/test_real_weights.py \
  tests/test_stages_oom.py tests/test_speed.py
part compiled "${T4:-150}" env NAME=compiled COMPILE=1 GRAPHS=1 DIFFUSERS=0 BATCHES="1 4" PYTHON="$PY" \
  bash scripts/gpu_check.sh
