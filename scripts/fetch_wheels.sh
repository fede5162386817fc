#!/usr/bin/env bash
# Fetch the wheels scripts/gpu_check.sh carries to a machine with no network (into wheels/, which git ignores):
# diffusers, the benchmark's baseline (a pure-Python wheel, any Python). Installed with --no-deps: what it imports
# comes with transformers on that image (its declared importlib_metadata it imports only on Python before 3.8).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d wheels \
  "diffusers==0.42.1"
ls -la wheels
