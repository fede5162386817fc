#!/usr/bin/env bash
# Create .venv and install the project with its test tools, from nothing but Python 3.10+.
#
# torch: on a machine without an NVIDIA GPU a CPU build is installed (a plain `pip install torch` would pull a
# multi-GB CUDA build). Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.9.1") and, where the PyTorch CPU wheel
# index is reachable, TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
# EXTRAS picks the optional dependency groups (default: pipeline,test).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_SPEC="torch>=2.5"
  else
    TORCH_SPEC="torch==2.13.0"
  fi
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "installing $TORCH_SPEC" >&2
  "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi
echo "installing the project (.[${EXTRAS:-pipeline,test}])" >&2
"${pip[@]}" -e ".[${EXTRAS:-pipeline,test}]"
.venv/bin/python -c "import torch, cascade; print(f'ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
