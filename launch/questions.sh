#!/usr/bin/env bash
# The demo-scale study behind docs/questions.md (the paper's open questions) and the search for an EBM prior
# that beats a Gaussian mixture: one Laplace model of the demo (3-modality PolyMNIST, configs/polymnist_demo.yaml
# without its energy stage, 1,400 steps), then EBM priors fitted to that frozen model with every reference and
# chain (model.prior.fit=posthoc: the same encoders and decoders on every row), then three joint-training designs
# trained from scratch, every run evaluated alike (2,000 samples, seed 0), then `mmebm questions`.
# Idempotent: a finished run (RUN/done) or eval is not redone; an interrupted run resumes.
# Usage: launch/questions.sh [RUNS_DIR]   (default runs/questions; environment: MMEBM, DATA, JOBS=2 runs at once)
# Each run uses one thread; on 2 cores the whole study takes about 2 hours with JOBS=2.
set -euo pipefail
OUT=${1:-runs/questions}
MMEBM=${MMEBM:-.venv/bin/mmebm}
DATA=${DATA:-data/polymnist_demo}
JOBS=${JOBS:-2}
EVAL=(--classifiers "$DATA/classifiers" --num-samples 2000 --no-frechet --no-elbo --probe-fit 0 --subset-sizes
      --device cpu --seed 0)
mkdir -p "$OUT"

if [ ! -f "$DATA/manifest.json" ]; then "$MMEBM" data polymnist --source mnist --modalities 3 --out "$DATA"; fi
if [ ! -d "$DATA/classifiers" ]; then OMP_NUM_THREADS=1 "$MMEBM" classifiers train --data "$DATA" --epochs 1; fi

train() {  # train NAME ARGS...: train (or resume) OUT/NAME, then mark it done
  local run=$OUT/$1; shift
  [ -f "$run/done" ] && return 0
  if [ -f "$run/config.json" ]; then "$MMEBM" train --resume "$run"; else "$MMEBM" train "$@" train.out_dir="$run"; fi
  touch "$run/done"
}
evaluate() {  # evaluate NAME [EVAL_DIR] [EXTRA ARGS...]
  local run=$OUT/$1 name=${2:-eval}; shift; shift || true
  [ -f "$run/$name/eval.json" ] && return 0
  OMP_NUM_THREADS=1 "$MMEBM" eval --run "$run" "${EVAL[@]}" --out "$run/$name" "$@"
}

# 1. The frozen model: the demo's reference stage as a Laplace-prior run; the post-hoc mixtures on it.
DEMO=(--config configs/polymnist_demo.yaml data.path="$DATA" train.threads=1 train.image_every=0)
train lap_s0 --config configs/polymnist_demo.yaml data.path="$DATA" 'train.schedule=[]' model.prior.kind=laplace \
  train.steps=1400 train.checkpoint_every=200
evaluate lap_s0 eval --gmm-components 10 50
evaluate lap_s0 eval_gmmk --gmm-components 100 200

# 2. EBM priors fitted to it (1,600 energy steps at lr 3e-3, as the demo's energy stage), one per line:
#    NAME then overrides. 3. Joint-training designs from scratch: 1,000 reference + 1,200 energy + 400 joint steps
#    (the same 1,400 encoder/decoder and 1,600 energy steps as the fitted rows).
POSTHOC=("${DEMO[@]}" 'train.schedule=[]' model.prior.fit=posthoc train.init_from="$OUT/lap_s0" train.steps=1600
         model.prior.lr=3e-3 train.checkpoint_every=400)
GMM=(model.prior.reference=gmm)
JOINT=("${DEMO[@]}" train.steps=2600 train.checkpoint_every=400)
STAGES="{stage: reference, steps: 1000}, {stage: energy, steps: 1200, prior_lr: 3.0e-3}"
jobs_list() {
  cat <<EOF
L_s03 ${POSTHOC[*]} model.prior.langevin.steps=120 model.prior.langevin.step_size=0.3
L_s03_long ${POSTHOC[*]} model.prior.langevin.steps=120 model.prior.langevin.step_size=0.3 train.steps=4800
Gs_s03 ${POSTHOC[*]} model.prior.reference=gaussian model.prior.langevin.steps=120 model.prior.langevin.step_size=0.3
G_s03 ${POSTHOC[*]} ${GMM[*]} model.prior.langevin.steps=120 model.prior.langevin.step_size=0.3
G_s01 ${POSTHOC[*]} ${GMM[*]} model.prior.langevin.steps=60 model.prior.langevin.step_size=0.1
G_s005 ${POSTHOC[*]} ${GMM[*]} model.prior.langevin.steps=60 model.prior.langevin.step_size=0.05
G_sir ${POSTHOC[*]} ${GMM[*]} model.prior.langevin.init=sir model.prior.langevin.steps=30 model.prior.langevin.step_size=0.1
G_s01_long ${POSTHOC[*]} ${GMM[*]} model.prior.langevin.steps=60 model.prior.langevin.step_size=0.1 train.steps=4800
G_s01_9600 ${POSTHOC[*]} ${GMM[*]} model.prior.langevin.steps=60 model.prior.langevin.step_size=0.1 train.steps=9600
J1_gmm ${JOINT[*]} ${GMM[*]} model.prior.langevin.steps=60 model.prior.langevin.step_size=0.1 'train.schedule=[$STAGES, {stage: joint, steps: 400, prior_lr: 1.0e-3}]'
J2_gmm_slow ${JOINT[*]} ${GMM[*]} model.prior.langevin.steps=60 model.prior.langevin.step_size=0.1 'train.schedule=[$STAGES, {stage: joint, steps: 400, lr: 1.0e-3, prior_lr: 1.0e-3}]'
J3_lap ${JOINT[*]} model.prior.langevin.steps=120 model.prior.langevin.step_size=0.3 'train.schedule=[$STAGES, {stage: joint, steps: 400, prior_lr: 1.0e-3}]'
EOF
}
export -f train evaluate
export OUT MMEBM
one() {  # one NAME ARGS...: train and evaluate a study run (the joint designs also fit GMM-50 to their model)
  local name=$1; shift
  train "$name" "$@" >"$OUT/$name.log" 2>&1 || { echo "$name: training failed (log: $OUT/$name.log)"; return 1; }
  case $name in J*) evaluate "$name" eval --gmm-components 50 ;; *) evaluate "$name" ;; esac \
    >>"$OUT/$name.log" 2>&1 || { echo "$name: evaluation failed (log: $OUT/$name.log)"; return 1; }
  echo "$name: done"
}
export -f one
export EVAL_STR="${EVAL[*]}"
jobs_list | xargs -P "$JOBS" -L 1 bash -c 'EVAL=($EVAL_STR); one "$@"' _

# 4. The posterior refinement and log p(X) of (c), on the GMM-reference prior fitted for 4,800 steps.
for step in 0.05 0.1; do
  evaluate G_s01_long "eval_refine_$step" --langevin-sweep --refine-steps 0 10 30 --refine-step-size "$step" \
    --likelihood-particles 100 --likelihood-tuples 200
done
"$MMEBM" questions --runs "$OUT/*" --out-md docs/questions.md --out-json docs/questions.json \
  --notes docs/questions_notes.md
