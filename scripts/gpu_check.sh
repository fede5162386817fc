#!/usr/bin/env bash
# The GPU check: one prepared run for a machine with one H100/H200, its own python3 with torch (and transformers,
# safetensors, numpy, Pillow) preinstalled, and no network. It installs what it carries in wheels/ (diffusers, for
# the baseline: fetch them beforehand with scripts/fetch_wheels.sh), then runs `python -m jobs.bench` on the
# official architectures at full size with random weights (values do not change the work), in bf16 at 1024 x 1024,
# default steps (20 + 10), a few batch sizes, diffusers' pipelines on the same weights in the same run, and prints the
# table (MFU against the card's dense bf16 matmul rate, measured in the same run). 3.7 minutes on an H200 with
# BATCHES="1 4 8" (2026-11-27, before the attention fix).
#
# Settings (environment): MODEL (random-big), SIZE (1024), BATCHES ("1 4"), PRIOR_STEPS (20), DECODER_STEPS (10),
# REPEATS (2), OUT (bench/: the JSON goes there), NAME (gpu-check: the JSON's name), COMPILE (0; 1 compiles Stage C's
# and Stage B's blocks, cascade/speed.py), GRAPHS (0; 1 runs their forward passes as CUDA graphs), FP8 (0; 1 runs
# Stage C's token linear layers as float8 products, as the job's fp8, cascade/float8.py), DIFFUSERS (1; 0 leaves the baseline out),
# PYTHON (python3). On a CPU, MODEL=tiny SIZE=256 proves the script at a reduced size.
# The Ray pipeline part of the benchmark is left out here: Ray is not on that image and its wheel
# is too large to carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench}
mkdir -p "$OUT"
"$PY" - <<'PYEOF'
import torch
print(f"[gpu-check] torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), flush=True)
PYEOF
if ! "$PY" -c "import diffusers" >/dev/null 2>&1; then
  if ls wheels/*.whl >/dev/null 2>&1; then
    # Not fatal: without diffusers the table still has our figures (the bench says the baseline is missing).
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps wheels/*.whl \
      || echo "[gpu-check] installing wheels/ failed: no diffusers baseline in this run" >&2
  else
    echo "[gpu-check] diffusers is missing and wheels/ is empty: no baseline (run scripts/fetch_wheels.sh first)" >&2
  fi
fi
EXTRA=()
[ "${COMPILE:-0}" = 1 ] && EXTRA+=(--compile)
[ "${GRAPHS:-0}" = 1 ] && EXTRA+=(--graphs)
[ "${FP8:-0}" = 1 ] && EXTRA+=(--fp8)
[ "${DIFFUSERS:-1}" = 0 ] && EXTRA+=(--no-diffusers)
# shellcheck disable=SC2086  # BATCHES is a list
PYTHONPATH=. exec "$PY" -m jobs.bench --model "${MODEL:-random-big}" --size "${SIZE:-1024}" --batch ${BATCHES:-1 4} \
  --prior-steps "${PRIOR_STEPS:-20}" --decoder-steps "${DECODER_STEPS:-10}" --repeats "${REPEATS:-2}" --warmup 1 \
  --dtype auto --ray-prompts 0 --json "$OUT/${NAME:-gpu-check}.json" "${EXTRA[@]}"
