#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install rpat with its pinned dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c 'import rpat, torch, snakemake, mlflow, pyautoattack, pytest' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.rpat-installed ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  touch .venv/.rpat-installed
fi
.venv/bin/python -c 'import rpat, torch; print(f"rpat ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}")'
