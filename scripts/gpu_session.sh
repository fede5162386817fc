#!/usr/bin/env bash
# Everything a short GPU lease should measure, each part under its own time limit (and all under TOTAL) so that a
# slow part cannot starve the rest, each writing into OUT as it goes (a stopped run keeps what it measured). Three
# sessions (2026-11-27, 2026-11-29, 2026-11-30: docs/PERFORMANCE.md) measured all of it but three parts; those come
# first, then the rest again (the figures to compare a change with), in this order:
#   share: one GPU shared by 1 and 2 Stage B/A processes at batch 4 (at batch 1 two gave 1.41x one): not measured;
#   tuned: compiled Stage B and Stage C passes with Inductor's coordinate descent tuning of its fused kernels (GRN's
#      two kernels ran at 1.9 TB/s of the card's 4.8 on 2026-11-30, 23 of Stage B's 125 ms): not measured;
#   autotune: Stage B compiled in max-autotune-no-cudagraphs mode (Inductor's product kernels with fused epilogues):
#      still compiling after 150 s on 2026-11-30;
#   fp8: the pipeline with compiled blocks and float8 Stage C (the job's `fp8: true`), batch 8, one timed repeat;
#   compiled: the pipeline with compiled blocks, batch 8, one timed repeat;
#   compiled_b: a guided Stage B pass at batch 4 (Stage B is the gap to the floor), eager and compiled, with the
#      compiled variants tried to close it: GRN folded into the next product, CUDA graphs, channels-last memory;
#   compiled_c: the same for Stage C: compiled, compiled as CUDA graphs, compiled with float8;
#   fp8_b: a compiled Stage B pass at batch 4 in bf16, with float8 in its wide blocks only (c >= 1024), and all float8;
#   gputests: the GPU tests (-m gpu), each named as it passes or fails;
#   check: the GPU check (scripts/gpu_check.sh), the headline table against diffusers, batches 4 and 8, eager.
# The limits add up to more than TOTAL on purpose: each is a cap for a part that hangs, and the parts before usually
# finish well inside theirs, leaving the rest to the later ones. Each part saves its figures as they come, so one
# stopped at its own limit keeps what it measured (a run killed from outside loses the part in progress: the tar is
# made after each part). Everything is packed into OUT/session.tar after each part (below).
# Usage: OUT=dir bash scripts/gpu_session.sh (about 9.5 minutes on an H200: give it a device call of 10).
# Settings (environment): OUT (bench/), PYTHON (python3), MODEL (random-big), SIZE (1024), TOTAL (570 s for all),
# PARTS (the parts to run, in order: all of the above), and each part's limit in seconds as LIMIT_<part> (share 60,
# tuned 150, autotune 240, fp8 110, compiled 100, compiled_b 170, compiled_c 90, fp8_b 120, gputests 60, check 150). A part
# still running at its limit gets SIGTERM, and SIGKILL 10 s later. On a CPU, MODEL=tiny SIZE=256 proves the script
# (the profiles and share run on the CPU in fp32, float8 on the CPU's reference arithmetic, and the GPU tests skip).
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
PROFILE=("$PY" scripts/profile_stages.py --model "$MODEL" --size "$SIZE" --batch 4 --top 8)
ALL="share tuned autotune fp8 compiled compiled_b compiled_c fp8_b gputests check"
for name in ${PARTS:-$ALL}; do
  limit_var=LIMIT_$name
  case $name in
    compiled_b) part "$name" "${!limit_var:-170}" "${PROFILE[@]}" --stages stage_b --json "$OUT/$name.json" \
      --variants ours fold compiled compiled-fold compiled-graphs compiled-cl ;;
    compiled_c) part "$name" "${!limit_var:-90}" "${PROFILE[@]}" --stages stage_c --json "$OUT/$name.json" \
      --variants ours compiled compiled-graphs compiled-fp8 ;;
    fp8) part "$name" "${!limit_var:-110}" env NAME=fp8 COMPILE=1 FP8=1 DIFFUSERS=0 BATCHES=8 REPEATS=1 \
      PYTHON="$PY" bash scripts/gpu_check.sh ;;
    fp8_b) part "$name" "${!limit_var:-120}" "${PROFILE[@]}" --stages stage_b --json "$OUT/$name.json" \
      --variants compiled compiled-fp8-wide compiled-fp8 ;;
    tuned) part "$name" "${!limit_var:-150}" "${PROFILE[@]}" --json "$OUT/$name.json" --variants compiled tuned ;;
    autotune) part "$name" "${!limit_var:-240}" "${PROFILE[@]}" --stages stage_b --json "$OUT/$name.json" \
      --variants autotune ;;
    gputests) part "$name" "${!limit_var:-60}" "$PY" -m pytest -p no:cacheprovider -v -rfE -m gpu \
      --continue-on-collection-errors tests/test_speed.py tests/test_float8_gpu.py tests/test_float8.py \
      tests/test_gdf.py tests/test_real_weights.py tests/test_stages_oom.py ;;
    check) part "$name" "${!limit_var:-150}" env BATCHES="4 8" PYTHON="$PY" bash scripts/gpu_check.sh ;;
    compiled) part "$name" "${!limit_var:-100}" env NAME=compiled COMPILE=1 DIFFUSERS=0 BATCHES=8 REPEATS=1 \
      PYTHON="$PY" bash scripts/gpu_check.sh ;;
    share) part "$name" "${!limit_var:-60}" "$PY" scripts/share_gpu.py --model "$MODEL" --size "$SIZE" \
      --part decoder --batch 4 --procs 1 2 --seconds 15 --json "$OUT/share.json" ;;
    *) echo "== $name: no such part (PARTS: $ALL)" ;;
  esac
done
