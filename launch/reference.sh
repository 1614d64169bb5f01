#!/usr/bin/env bash
# docs/results_reference.{md,json}: the learned reference at the published PolyMNIST scale. Per seed: the
# Laplace control (configs/polymnist_laplace.yaml, 2,000 steps), then the EBM prior fitted to it post hoc as
# the fitted configs' energy stage trains (3,000 steps, energy lr 1e-3) over the Laplace reference
# (polymnist_ebm_fitted.yaml) and over the learned GMM-50 reference (polymnist_ebm_gmm.yaml); each evaluated on
# 5,000 samples, the control with the post-hoc GMM-10/50; then `mmebm results`. Idempotent.
# Usage: launch/reference.sh   (environment: SEEDS="0 1 2", OUT=runs/full, MMEBM, DATA=data/polymnist)
# About 1.5 hours of one core per seed on a 2-core CPU.
set -euo pipefail
SEEDS=${SEEDS-"0 1 2"}
OUT=${OUT:-runs/full}
MMEBM=${MMEBM:-.venv/bin/mmebm}
DATA=${DATA:-data/polymnist}
EVAL=(--classifiers "$DATA/classifiers" --num-samples 5000 --no-frechet --no-elbo --probe-fit 0 --subset-sizes
      --device cpu)
if [ ! -f "$DATA/manifest.json" ]; then "$MMEBM" data polymnist --source mnist --modalities 5 --out "$DATA"; fi
if [ ! -d "$DATA/classifiers" ]; then OMP_NUM_THREADS=1 "$MMEBM" classifiers train --data "$DATA"; fi
run() {  # run DIR ARGS...: train (or resume) a run once
  local dir=$1; shift
  [ -f "$dir/done" ] && return 0
  if [ -f "$dir/config.json" ]; then "$MMEBM" train --resume "$dir"; else "$MMEBM" train "$@" train.out_dir="$dir"; fi
  touch "$dir/done"
}
evaluate() {  # evaluate DIR [ARGS...]
  local dir=$1; shift
  [ -f "$dir/eval/eval.json" ] || OMP_NUM_THREADS=1 "$MMEBM" eval --run "$dir" "${EVAL[@]}" "$@"
}
for s in $SEEDS; do
  control=$OUT/polymnist_laplace_2000_s$s
  run "$control" --config configs/polymnist_laplace.yaml train.seed="$s" train.steps=2000 data.path="$DATA" \
    train.threads=1
  for pair in "polymnist_ebm_gmm configs/polymnist_ebm_gmm.yaml" "polymnist_ebm_fitted configs/polymnist_ebm_fitted.yaml"; do
    set -- $pair
    run "$OUT/${1}_s$s" --config "$2" 'train.schedule=[]' model.prior.fit=posthoc train.init_from="$control" train.seed="$s" \
      train.steps=3000 model.prior.lr=1e-3 data.path="$DATA" train.threads=1 train.image_every=0 \
      train.checkpoint_every=500
    evaluate "$OUT/${1}_s$s"
    # log p(X) under the prior, its reference alone and the base alone (the notes' likelihood figures)
    [ -f "$OUT/${1}_s$s/eval_ll/eval.json" ] || OMP_NUM_THREADS=1 "$MMEBM" eval --run "$OUT/${1}_s$s" \
      --classifiers "$DATA/classifiers" --num-samples 1000 --no-frechet --no-elbo --probe-fit 0 --subset-sizes \
      --device cpu --langevin-sweep --likelihood-particles 100 --likelihood-tuples 200 --out "$OUT/${1}_s$s/eval_ll"
  done
  evaluate "$control" --gmm-components 10 50
done
"$MMEBM" results --runs "$OUT/*" --out-md docs/results_reference.md --out-json docs/results_reference.json \
  --img-dir docs/img/results_reference --notes docs/results_reference_notes.md
