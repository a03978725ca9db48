#!/usr/bin/env bash
# One prepared GPU check: every GPU claim of minispin, measured in about eight minutes.
#   bash bench/gpu.sh [--dry] [--only ROW[,ROW]] [--out DIR] [--time SECONDS] [--hf-compile]
# Runs from any directory; imports minispin from this checkout (it need not be installed).
# PYTHON picks the interpreter (default python3). Rows and options: bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
