#!/usr/bin/env bash
# Fetch the wheels scripts/gpu_check.sh carries to a machine with no network (into wheels/, which git ignores):
# diffusers, the benchmark's baseline, and what it needs beyond that machine's image (pure-Python wheels, any Python).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d wheels \
  "diffusers==0.42.1" importlib_metadata
ls -la wheels
