#!/usr/bin/env bash
# Everything a short GPU lease should measure, in order of importance, each part under its own time limit (and all
# under TOTAL) so that a slow part cannot starve the rest, each writing into OUT as it goes (a stopped run keeps what
# it measured):
#   1. check: the GPU check (scripts/gpu_check.sh), the headline table against diffusers, batches 1, 4, 8;
#   2. profile: one guided pass per stage at batch 4, ours against ours with the conditioning done at every step (before
#      2026-11-29), with GRN's norm as a sum of squares (before 2026-11-28), on channels-last memory, with the
#      module's attention (before 2026-11-27), diffusers, and last with float8 linear layers (and their output's
#      error) (scripts/profile_stages.py: a variant that fails is recorded and the rest go on);
#   3. fp8: our pipeline with float8 linear layers, batch 4 (eager, no baseline);
#   4. stagea: Stage A's decode as it is (ResBlocks' passes fused, channels-last memory) against NCHW memory and
#      the ResBlocks before 2026-11-29 (scripts/stage_a_variants.py);
#   5. compiled: compiled blocks with float8 linear layers at batch 4, one timed repeat, where float8's scaling passes
#      fuse (compiling takes most of its limit; each stage's figure is printed and saved as it comes, Stage C's
#      first, so a run stopped at the limit keeps what it timed);
#   6. share: one GPU shared by 1 and 2 Stage B/A processes, the model behind packed actors (scripts/share_gpu.py);
#   7. gputests: the GPU tests (-m gpu), float8's first, each named as it passes or fails (a module that cannot be
#      collected on that image costs only its own tests).
# The limits add up to more than TOTAL on purpose: each is a cap for a part that hangs, and the parts before usually
# finish well inside theirs, leaving the rest to the later ones. The check took 3.7 minutes on an H200 with these
# batches (2026-11-27, the wheel install included, before the attention fix made our side faster); every part saves
# its figures as they come, so one stopped at its limit keeps what it measured.
# Usage: OUT=dir bash scripts/gpu_session.sh (about 9.5 minutes on an H200: give it a device call of 10).
# Settings (environment): OUT (bench/), PYTHON (python3), MODEL (random-big), SIZE (1024), TOTAL (570 s for all),
# T1..T7, each part's limit in seconds, in the order above (240, 90, 60, 30, 150, 60, 75). A part still running
# at its limit gets SIGTERM, and SIGKILL 10 s later. On a CPU, MODEL=tiny
# SIZE=256 T4=60 proves the script (the profile, stagea and share parts then run on the CPU in fp32, and the GPU tests
# skip).
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
  if [ "$limit" -lt 10 ]; then echo "== $name: skipped (limit ${limit}s: ${left}s left of ${TOTAL}s)"; return; fi
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? (limit ${limit}s, at ${SECONDS}s)"
  tail -n 8 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
part check "${T1:-240}" env BATCHES="1 4 8" PYTHON="$PY" bash scripts/gpu_check.sh
part profile "${T2:-90}" "$PY" scripts/profile_stages.py --model "$MODEL" --size "$SIZE" \
  --batch 4 --top 6 --variants ours raw squares cl mha diffusers fp8 --json "$OUT/profile.json"
part fp8 "${T3:-60}" env NAME=fp8 FP8=1 DIFFUSERS=0 BATCHES=4 PYTHON="$PY" bash scripts/gpu_check.sh
part stagea "${T4:-30}" "$PY" scripts/stage_a_variants.py --size "$SIZE" --batch 4 --repeats 3 \
  --json "$OUT/stage_a.json"
part compiled "${T5:-150}" env NAME=compiled COMPILE=1 FP8=1 DIFFUSERS=0 BATCHES=4 REPEATS=1 PYTHON="$PY" \
  bash scripts/gpu_check.sh
part share "${T6:-60}" "$PY" scripts/share_gpu.py --model "$MODEL" --size "$SIZE" --part decoder --batch 1 \
  --procs 1 2 --seconds 12 --json "$OUT/share.json"
part gputests "${T7:-75}" "$PY" -m pytest -p no:cacheprovider -v -rfE -m gpu --continue-on-collection-errors \
  tests/test_float8_gpu.py tests/test_float8.py tests/test_gdf.py \
  tests/test_real_weights.py tests/test_stages_oom.py tests/test_speed.py
