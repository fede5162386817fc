#!/usr/bin/env bash
# Everything a short GPU lease should measure, in order of importance, each part under its own time limit (and all
# under TOTAL) so that a slow part cannot starve the rest, each writing into OUT as it goes (a stopped run keeps what
# it measured):
#   1. check: the GPU check (scripts/gpu_check.sh), the headline table against diffusers, batches 1, 4, 8;
#   2. profile: one guided pass per stage, ours against ours with the conditioning done at every step (before
#      2026-11-29), with GRN's norm as a sum of squares (before 2026-11-28), on channels-last memory, with float8
#      linear layers (and their output's error), with the module's attention (before 2026-11-27) and diffusers
#      (scripts/profile_stages.py);
#   3. stagea: Stage A's decode as it is (ResBlocks' passes fused, channels-last memory) against NCHW memory and
#      the ResBlocks before 2026-11-29 (scripts/stage_a_variants.py);
#   4. share: one GPU shared by 1 and 2 Stage B/A processes, the model behind packed actors (scripts/share_gpu.py);
#   5. fp8: our pipeline with float8 linear layers, batches 4, 8 (eager, no baseline);
#   6. gputests: the GPU tests (-m gpu);
#   7. compiled: compiled blocks with float8 linear layers at batch 4, where float8's scaling passes fuse
#      (compiling takes most of its limit).
# Usage: OUT=dir bash scripts/gpu_session.sh (about 9.5 minutes on an H200: give it a device call of 10).
# Settings (environment): OUT (bench/), PYTHON (python3), MODEL (random-big), SIZE (1024), TOTAL (570 s for all),
# T1..T7, each part's limit in seconds (220, 130, 30, 75, 70, 75, 115). On a CPU, MODEL=tiny SIZE=256 T3=60 proves
# the script (the profile, stagea and share parts then run on the CPU in fp32, and the GPU tests skip).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench} PYTHONUNBUFFERED=1 PYTHONPATH=.
PY=${PYTHON:-python3}
MODEL=${MODEL:-random-big} SIZE=${SIZE:-1024} TOTAL=${TOTAL:-570}
mkdir -p "$OUT"
part() {  # part NAME LIMIT COMMAND...: run one part (within what TOTAL leaves), log to OUT/NAME.log, print its tail
  local name=$1 limit=$2 left=$((TOTAL - SECONDS))
  shift 2
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then echo "== $name: skipped (${left}s left of ${TOTAL}s)"; return; fi
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? (limit ${limit}s, at ${SECONDS}s)"
  tail -n 8 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
part check "${T1:-220}" env BATCHES="1 4 8" PYTHON="$PY" bash scripts/gpu_check.sh
part profile "${T2:-130}" "$PY" scripts/profile_stages.py --model "$MODEL" --size "$SIZE" \
  --batch 1 4 --top 6 --variants ours fp8 raw squares cl mha diffusers --json "$OUT/profile.json"
part stagea "${T3:-30}" "$PY" scripts/stage_a_variants.py --size "$SIZE" --batch 4 --repeats 3 \
  --json "$OUT/stage_a.json"
part share "${T4:-75}" "$PY" scripts/share_gpu.py --model "$MODEL" --size "$SIZE" --part decoder --batch 1 \
  --procs 1 2 --seconds 12 --json "$OUT/share.json"
part fp8 "${T5:-70}" env NAME=fp8 FP8=1 DIFFUSERS=0 BATCHES="4 8" PYTHON="$PY" bash scripts/gpu_check.sh
part gputests "${T6:-75}" "$PY" -m pytest -p no:cacheprovider -q -m gpu tests/test_gdf.py tests/test_real_weights.py \
  tests/test_stages_oom.py tests/test_speed.py tests/test_float8.py
part compiled "${T7:-115}" env NAME=compiled COMPILE=1 FP8=1 DIFFUSERS=0 BATCHES=4 PYTHON="$PY" \
  bash scripts/gpu_check.sh
