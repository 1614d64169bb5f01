#!/usr/bin/env bash
# docs/results_reference*.{md,json}: the learned reference at the published scale. Per data set and seed: the
# step-matched Laplace control, then the EBM prior fitted to it post hoc as the fitted configs' energy stage
# trains (3,000 steps, energy lr 1e-3) over the Laplace reference (the *_ebm_fitted.yaml config) and over the
# learned GMM-50 reference (the *_ebm_gmm.yaml config); each evaluated on 5,000 samples, the control with the
# post-hoc GMM-10/50; then `mmebm results`. Idempotent: finished runs and evaluations are skipped.
#   DATASET=polymnist (default): configs/polymnist_*, 2,000 control steps -> docs/results_reference.md
#   DATASET=fashion:   configs/polyfashion_*, 2,000 control steps       -> docs/results_reference_fashion.md
#   DATASET=mnist_svhn: configs/mnist_svhn_*, 12,000 control steps      -> docs/results_reference_mnist_svhn.md
# Usage: launch/reference.sh   (environment: DATASET, SEEDS="0 1 2", OUT=runs/full, MMEBM, DATA)
# PolyMNIST and Fashion-MNIST: about 30 min of one core per seed on a 2-core CPU (AMD EPYC), MNIST + SVHN longer.
set -euo pipefail
DATASET=${DATASET:-polymnist}
SEEDS=${SEEDS-"0 1 2"}
OUT=${OUT:-runs/full}
MMEBM=${MMEBM:-.venv/bin/mmebm}
case "$DATASET" in
  polymnist) prefix=polymnist; control_config=polymnist_laplace; control_steps=2000; doc=results_reference
             build=(data polymnist --source mnist --modalities 5) ;;
  fashion) prefix=polyfashion; control_config=polyfashion_laplace; control_steps=2000
           doc=results_reference_fashion; build=(data polymnist --source fashion --modalities 5) ;;
  mnist_svhn) prefix=mnist_svhn; control_config=mnist_svhn_laplace_control; control_steps=12000
              doc=results_reference_mnist_svhn; build=(data mnist-svhn --encoding raw) ;;
  *) echo "launch/reference.sh: unknown DATASET '$DATASET'; choose polymnist, fashion or mnist_svhn" >&2; exit 2 ;;
esac
DATA=${DATA:-data/$DATASET}
EVAL=(--classifiers "$DATA/classifiers" --num-samples 5000 --no-frechet --no-elbo --probe-fit 0 --subset-sizes
      --device cpu)
if [ ! -f "$DATA/manifest.json" ]; then "$MMEBM" "${build[@]}" --out "$DATA"; fi
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
  control=$OUT/${prefix}_laplace_${control_steps}_s$s
  run "$control" --config "configs/$control_config.yaml" train.seed="$s" train.steps="$control_steps" \
    data.path="$DATA" train.threads=1
  for kind in gmm fitted; do
    run "$OUT/${prefix}_ebm_${kind}_s$s" --config "configs/${prefix}_ebm_${kind}.yaml" 'train.schedule=[]' \
      model.prior.fit=posthoc train.init_from="$control" train.seed="$s" train.steps=3000 model.prior.lr=1e-3 \
      data.path="$DATA" train.threads=1 train.image_every=0 train.checkpoint_every=500
    evaluate "$OUT/${prefix}_ebm_${kind}_s$s"
    # log p(X) under the prior, its reference alone and the base alone (the notes' likelihood figures)
    [ -f "$OUT/${prefix}_ebm_${kind}_s$s/eval_ll/eval.json" ] || OMP_NUM_THREADS=1 "$MMEBM" eval \
      --run "$OUT/${prefix}_ebm_${kind}_s$s" --classifiers "$DATA/classifiers" --num-samples 1000 --no-frechet \
      --no-elbo --probe-fit 0 --subset-sizes --device cpu --langevin-sweep --likelihood-particles 100 \
      --likelihood-tuples 200 --out "$OUT/${prefix}_ebm_${kind}_s$s/eval_ll"
  done
  evaluate "$control" --gmm-components 10 50
done
notes=(); [ -f "docs/${doc}_notes.md" ] && notes=(--notes "docs/${doc}_notes.md")
"$MMEBM" results --runs "$OUT/${prefix}_*" --likelihood-eval eval_ll --out-md "docs/$doc.md" \
  --out-json "docs/$doc.json" --img-dir "docs/img/$doc" "${notes[@]}"
