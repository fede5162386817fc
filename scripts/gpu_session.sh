#!/usr/bin/env bash
# Everything a short GPU lease should measure, in order of importance, each part under its own time limit (and all
# under TOTAL) so that a slow part cannot starve the rest, each writing into OUT as it goes (a stopped run keeps what
# it measured). The first two sessions (2026-11-27 and 2026-11-29, docs/PERFORMANCE.md) measured the eager figures,
# the profile of every optimisation and Stage A's variants; this one measures what the job's settings give:
#   1. check: the GPU check (scripts/gpu_check.sh), the headline table against diffusers, batches 4 and 8, eager;
#   2. compiled: compiled blocks (the job's `compile: true`), batch 8 (batch 4 was measured), one timed repeat;
#   3. fp8: compiled blocks with float8 Stage C (the job's `fp8: true`), batches 4 and 8, one timed repeat;
#   4. profile: one guided pass per stage at batch 4, ours and float8 (eager, with its output's error against ours,
#      on the random model's zero-initialised weights made non-zero: NaN before);
#   5. share: one GPU shared by 1 and 2 Stage B/A processes at batch 4 (at batch 1 two gave 1.41x one);
#   6. gputests: the GPU tests (-m gpu), each named as it passes or fails.
# The limits add up to more than TOTAL on purpose: each is a cap for a part that hangs, and the parts before usually
# finish well inside theirs, leaving the rest to the later ones. Each part saves its figures as they come, so one
# stopped at its own limit keeps what it measured (a run killed from outside loses the part in progress: the tar is
# made after each part). Everything is packed into OUT/session.tar after each part (below).
# Usage: OUT=dir bash scripts/gpu_session.sh (about 9.5 minutes on an H200: give it a device call of 10).
# Settings (environment): OUT (bench/), PYTHON (python3), MODEL (random-big), SIZE (1024), TOTAL (570 s for all),
# T1..T6, each part's limit in seconds, in the order above (150, 100, 130, 60, 60, 60). A part still running at its
# limit gets SIGTERM, and SIGKILL 10 s later. On a CPU, MODEL=tiny SIZE=256 proves the script (the profile and share
# parts then run on the CPU in fp32, float8 on the CPU's reference arithmetic, and the GPU tests skip).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench}
mkdir -p "$RESULTS"
# The parts write their logs and JSON into a folder of their own, packed into RESULTS/session.tar after each part:
# a device call returns at most 8 files (on 2026-11-29 five logs did not come back). `tar -xf session.tar` unpacks it.
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=.
PY=${PYTHON:-python3}
MODEL=${MODEL:-random-big} SIZE=${SIZE:-1024} TOTAL=${TOTAL:-570}
part() {  # part NAME LIMIT COMMAND...: run one part (within what TOTAL leaves), log to OUT/NAME.log, print its tail
  local name=$1 limit=$2 left=$((TOTAL - SECONDS))
  shift 2
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then echo "== $name: skipped (limit ${limit}s: ${left}s left of ${TOTAL}s)"; return; fi
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? (limit ${limit}s, at ${SECONDS}s)"
  tail -n 8 "$OUT/$name.log"
  tar -cf "$RESULTS/.session.tar" -C "$OUT" . && mv "$RESULTS/.session.tar" "$RESULTS/session.tar"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
part check "${T1:-150}" env BATCHES="4 8" PYTHON="$PY" bash scripts/gpu_check.sh
part compiled "${T2:-100}" env NAME=compiled COMPILE=1 DIFFUSERS=0 BATCHES=8 REPEATS=1 PYTHON="$PY" \
  bash scripts/gpu_check.sh
part fp8 "${T3:-130}" env NAME=fp8 COMPILE=1 FP8=1 DIFFUSERS=0 BATCHES="4 8" REPEATS=1 PYTHON="$PY" \
  bash scripts/gpu_check.sh
part profile "${T4:-60}" "$PY" scripts/profile_stages.py --model "$MODEL" --size "$SIZE" \
  --batch 4 --top 6 --variants ours fp8 --json "$OUT/profile.json"
part share "${T5:-60}" "$PY" scripts/share_gpu.py --model "$MODEL" --size "$SIZE" --part decoder --batch 4 \
  --procs 1 2 --seconds 15 --json "$OUT/share.json"
part gputests "${T6:-60}" "$PY" -m pytest -p no:cacheprovider -v -rfE -m gpu --continue-on-collection-errors \
  tests/test_speed.py tests/test_float8_gpu.py tests/test_float8.py tests/test_gdf.py \
  tests/test_real_weights.py tests/test_stages_oom.py
