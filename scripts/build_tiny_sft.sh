#!/usr/bin/env bash
# Rebuild assets/models/tiny-sft, the bundled θ_0 of the tiny recipe:
# stories260K (a real 260K-parameter TinyStories Llama) after supervised fine-tuning on
# the 2000 bundled GSM8K training problems, with SPIN's chat template, by this project's
# own `train.py --sft` and the [sft] table of configs/tiny.toml (AdamW, lr 1e-3, cosine,
# 3 epochs, batch 16). One CPU thread, fixed seed: about 6 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
run=runs/tiny-sft-build
OMP_NUM_THREADS=1 python train.py --sft --run-dir "$run" --force --no-progress
rm -rf assets/models/tiny-sft
cp -r "$run/sft/model" assets/models/tiny-sft
cp "$run/sft/metrics.jsonl" assets/models/tiny-sft.sft-metrics.jsonl
echo "rebuilt assets/models/tiny-sft from $run/sft/model"
