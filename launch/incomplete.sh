#!/usr/bin/env bash
# Coherence when tuples lack modalities (docs/incomplete.md): 3-modality PolyMNIST as `make demo` builds it,
# with each modality of each train and test tuple dropped at the rates $RATES (`mmebm data polymnist
# --drop-rate`); on each set the demo's staged EBM-prior recipe (configs/polymnist_demo.yaml) and its
# step-matched Laplace control (model.prior.kind=laplace, as many encoder/decoder steps as the EBM run's
# reference stage; its energy stage moves only the energy), one seed each, $PARALLEL at a time with one thread
# each. The coherence classifiers are trained once, on the complete set (rate 0), and judge every set: an
# incomplete set records its complete twin's manifest hash. `mmebm eval` reads the test tuples that hold
# every modality. Then `mmebm results` writes the table (one data set per drop rate).
# Usage: launch/incomplete.sh   (environment: RATES, REFERENCE_STEPS, ENERGY_STEPS, EVAL_SAMPLES, PARALLEL,
#   DATA (prefix of the data sets), OUT (run folder), DOCS (prefix of the .md/.json written), BUILD_ARGS,
#   CLASSIFIER_ARGS, TRAIN_ARGS (extra key=value for every run), EVAL_ARGS, MMEBM). Every step is idempotent:
#   existing data, classifiers, finished runs and evals are reused; an interrupted run resumes.
set -euo pipefail
MMEBM=${MMEBM:-.venv/bin/mmebm}
RATES=${RATES:-"0 0.25 0.5"}
REFERENCE_STEPS=${REFERENCE_STEPS:-1400}
ENERGY_STEPS=${ENERGY_STEPS:-1600}
EVAL_SAMPLES=${EVAL_SAMPLES:-1000}
PARALLEL=${PARALLEL:-2}
DATA=${DATA:-data/polymnist_demo_drop}
OUT=${OUT:-runs/incomplete}
DOCS=${DOCS:-docs/incomplete}
BUILD_ARGS=${BUILD_ARGS:-"--source mnist --modalities 3"}
CLASSIFIER_ARGS=${CLASSIFIER_ARGS:-"--epochs 1"}
CONFIG=configs/polymnist_demo.yaml
suffix() { awk -v r="$1" 'BEGIN { printf "%d", r * 100 + 0.5 }'; }  # 0.25 -> 25
COMPLETE="$DATA$(suffix 0)"

# The data sets (the same seed: rate 0 is the complete set, the others drop from its tuples).
for rate in $(printf '%s\n' 0 $RATES | sort -u); do
  dir="$DATA$(suffix "$rate")"
  if [ ! -f "$dir/manifest.json" ]; then
    # shellcheck disable=SC2086  # the flag string splits into words on purpose
    "$MMEBM" data polymnist $BUILD_ARGS --drop-rate "$rate" --out "$dir"
  fi
  "$MMEBM" data info "$dir"
done
if [ ! -d "$COMPLETE/classifiers" ]; then
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 "$MMEBM" classifiers train --data "$COMPLETE" $CLASSIFIER_ARGS
fi

# One job per line: NAME DATA OVERRIDES...
STAGES="[{stage: reference, steps: $REFERENCE_STEPS}, {stage: energy, steps: $ENERGY_STEPS, prior_lr: 3.0e-3}]"
job_lines() {
  for rate in $RATES; do
    local d; d="$DATA$(suffix "$rate")"
    echo "ebm_drop$(suffix "$rate")|$d|train.steps=$((REFERENCE_STEPS + ENERGY_STEPS))|train.schedule=$STAGES"
    echo "laplace_drop$(suffix "$rate")|$d|train.steps=$REFERENCE_STEPS|train.schedule=[]|model.prior.kind=laplace"
  done
}

train_and_eval() {  # NAME|DATA|OVERRIDE|...: train (or resume) one run, then evaluate it; NAME.failed if not
  local name data run
  IFS='|' read -r -a fields <<<"$1"
  name=${fields[0]}; data=${fields[1]}; run="$OUT/$name"
  # shellcheck disable=SC2206  # the extra overrides split into words on purpose
  local args=(data.path="$data" train.out_dir="$run" train.threads=1 "${fields[@]:2}" ${TRAIN_ARGS:-})
  rm -f "$run.failed"
  if [ ! -f "$run/eval/eval.json" ]; then
    if [ -f "$run/config.json" ]; then
      "$MMEBM" train --resume "$run" >"$run.log" 2>&1 || { touch "$run.failed"; return; }
    else
      "$MMEBM" train --config "$CONFIG" "${args[@]}" >"$run.log" 2>&1 || { touch "$run.failed"; return; }
    fi
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 "$MMEBM" eval --run "$run" --classifiers "$COMPLETE/classifiers" \
      --num-samples "$EVAL_SAMPLES" ${EVAL_ARGS:-} >>"$run.log" 2>&1 || { touch "$run.failed"; return; }
  fi
  echo "done: $run"
}

mkdir -p "$OUT"
while IFS= read -r job; do
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n || true; done
  train_and_eval "$job" &
done < <(job_lines)
wait
if compgen -G "$OUT/*.failed" >/dev/null; then
  echo "launch/incomplete.sh: failed: $(ls "$OUT"/*.failed); see $OUT/<name>.log" >&2
  exit 1
fi

runs=()
for rate in $RATES; do runs+=("$OUT/ebm_drop$(suffix "$rate")" "$OUT/laplace_drop$(suffix "$rate")"); done
"$MMEBM" results --runs "${runs[@]}" --out-md "$DOCS.md" --out-json "$DOCS.json" --img-dir "$(dirname "$DOCS")/img/incomplete" --notes "${DOCS}_notes.md"
