#!/usr/bin/env bash
# Rerun a published comparison, then regenerate its tables from the runs with `mmebm results`. Two suites:
#   SUITE=headline (default) -> docs/results.{md,json}: the one-command EBM prior (configs/polymnist_ebm.yaml:
#     reference -> energy -> joint stages in one run, 5,000 steps of which 2,000 move the encoders and decoders)
#     against its step-matched Laplace control (configs/polymnist_laplace.yaml, 2,000 steps) and the same run
#     with the energy fitted after 2,000 reference steps and no joint stage (configs/polymnist_ebm_fitted.yaml),
#     seeds $SEEDS on PolyMNIST; on Fashion-MNIST (seeds $FASHION_SEEDS) the fitted run and its control
#     (configs/polyfashion_ebm_fitted.yaml, polyfashion_laplace.yaml); on MNIST + generated street numbers
#     (seeds $MNIST_SVHN_SEEDS) configs/mnist_svhn_ebm_fitted.yaml and, for seeds $MNIST_SVHN_CONTROL_SEEDS
#     (default: all), mnist_svhn_laplace_control.yaml (the fitted run's reference stage bit for bit: a seed
#     without it reads the control's figures in the fitted run's own eval, sweep at 0 steps and cross, and
#     fits the samplers); on generated birds + captions (seeds $BIRDS_SEEDS, default 0)
#     configs/birds_ebm_fitted.yaml alone (its eval reads its reference stage as the Laplace control); an empty
#     SEEDS, FASHION_SEEDS, MNIST_SVHN_SEEDS or BIRDS_SEEDS skips that data set. Every run is evaluated with
#     the post-hoc baselines fitted to its frozen aggregate posterior (Gaussian mixtures of 10 and 50
#     components and a masked autoregressive flow: --gmm-components 10 50 --flow) but the fitted runs that
#     have a control, whose encoders and decoders are that control's.
#   SUITE=reference -> docs/results_reference{,_fashion,_mnist_svhn}.{md,json}: the EBM prior over a learned
#     GMM-50 reference against the post-hoc GMM-50 and the Laplace-reference EBM on the same frozen Laplace
#     control, per data set (launch/reference.sh with DATASET=polymnist, fashion, mnist_svhn; seeds $SEEDS).
#   SUITE=archive -> docs/results_archive.{md,json}: the earlier study (sessions 1-4), the paper's cold joint
#     training (configs/polymnist_ebm_joint.yaml, 1,500 steps) vs the Laplace prior over seeds $SEEDS;
#     Fashion-MNIST (5 modalities, Debian dataset-fashion-mnist): the same pair, seeds $FASHION_SEEDS, and the
#     post-hoc EBM prior with the finer chain (below);
#   ablation: the EBM prior over a Gaussian reference instead of Laplace (PolyMNIST, seed 0);
#   ablation: an EBM prior fitted post hoc to each frozen PolyMNIST Laplace run (model.prior.fit=posthoc: only
#     the energy trains, on the aggregate posterior; the Laplace prior becomes its reference), with the joint
#     runs' energy settings and with energy lr 5e-4 and no L2 penalty (and lr 5e-4 alone, seed 0), and with a
#     longer, finer Langevin chain (120 steps of 0.3), energy lr 1e-3, no L2 and $POSTHOC_LONG_STEPS steps;
#   then the whole model trained jointly for $JOINT_FT_STEPS steps from each of those post-hoc priors;
#   every run evaluated with $EVAL_SAMPLES joint samples / test tuples (plus the Langevin-steps sweep).
# Each step is idempotent: finished runs and evals are skipped, interrupted runs resume from their checkpoint.
# $PARALLEL runs train at a time with one thread each (2 on a 2-core machine). On 2 CPU cores a staged
# PolyMNIST run takes about 75 min of one core, its Laplace control about 45 min, each evaluation 10-15 min.
# Usage: launch/reproduce.sh  (environment: SUITE, SEEDS, FASHION_SEEDS, MNIST_SVHN_SEEDS,
#        MNIST_SVHN_CONTROL_SEEDS, BIRDS_SEEDS, EVAL_SAMPLES,
#        PARALLEL, OUT; archive also STEPS, POSTHOC_LONG_STEPS, JOINT_FT_STEPS)
set -euo pipefail
MMEBM=${MMEBM:-.venv/bin/mmebm}
SUITE=${SUITE:-headline}
STEPS=${STEPS:-1500}
SEEDS=${SEEDS-"0 1 2"}
EVAL_SAMPLES=${EVAL_SAMPLES:-5000}
POSTHOC_LONG_STEPS=${POSTHOC_LONG_STEPS:-3000}
JOINT_FT_STEPS=${JOINT_FT_STEPS:-500}
PARALLEL=${PARALLEL:-2}
case "$SUITE" in
  reference)
    for dataset in polymnist fashion mnist_svhn; do DATASET=$dataset SEEDS=$SEEDS bash launch/reference.sh; done
    exit 0 ;;
  headline)
    FASHION_SEEDS=${FASHION_SEEDS-"0 1 2"}; MNIST_SVHN_SEEDS=${MNIST_SVHN_SEEDS-"0 1 2"}
    MNIST_SVHN_CONTROL_SEEDS=${MNIST_SVHN_CONTROL_SEEDS-$MNIST_SVHN_SEEDS}; BIRDS_SEEDS=${BIRDS_SEEDS-"0"}
    OUT=${OUT:-runs/results}; DOC=docs/results
    IMG=docs/img/results; EVAL_ARGS="--gmm-components 10 50 --flow" ;;
  archive)
    FASHION_SEEDS=${FASHION_SEEDS-"0"}; MNIST_SVHN_SEEDS=""; BIRDS_SEEDS=""; OUT=${OUT:-runs/results_archive}
    DOC=docs/results_archive
    IMG=docs/img/results_archive; EVAL_ARGS="" ;;
  *) echo "launch/reproduce.sh: unknown SUITE '$SUITE'; choose headline, reference or archive" >&2; exit 2 ;;
esac
mkdir -p "$OUT"

# Data and the coherence classifiers (one per modality, trained on real data).
if [ -n "$SEEDS" ] && [ ! -f data/polymnist/manifest.json ]; then
  "$MMEBM" data polymnist --source mnist --modalities 5 --out data/polymnist
fi
if [ -n "$FASHION_SEEDS" ] && [ ! -f data/fashion/manifest.json ]; then
  "$MMEBM" data polymnist --source fashion --modalities 5 --out data/fashion
fi
if [ -n "$MNIST_SVHN_SEEDS" ] && [ ! -f data/mnist_svhn/manifest.json ]; then
  "$MMEBM" data mnist-svhn --out data/mnist_svhn --encoding raw
fi
if [ -n "$BIRDS_SEEDS" ] && [ ! -f data/birds/manifest.json ]; then
  "$MMEBM" data birds --out data/birds --encoding raw
fi
# Classifiers train in the background beside the first runs; each eval waits for its data set's classifiers.
# The birds attribute classifier at docs/datasets.md's size (width 16, batch 32: mean attribute accuracy 0.85).
for d in ${SEEDS:+data/polymnist} ${FASHION_SEEDS:+data/fashion} ${MNIST_SVHN_SEEDS:+data/mnist_svhn} \
         ${BIRDS_SEEDS:+data/birds}; do
  if [ -f "$d/manifest.json" ] && [ ! -d "$d/classifiers" ]; then
    rm -f "$d.classifiers.failed"
    args=(); [ "$d" = data/birds ] && args=(--steps 1500 --batch-size 32 --width 16)
    ( nice -n 5 "$MMEBM" classifiers train --data "$d" "${args[@]}" >"$d.classifiers.log" 2>&1 \
      || touch "$d.classifiers.failed" ) &
  fi
done

# The energy settings of the finer-chain post-hoc prior: 120 Langevin steps of 0.3, energy lr 1e-3, no L2.
FINER_POSTHOC="model.prior.fit=posthoc model.prior.lr=1e-3 model.prior.energy_l2=0 model.prior.langevin.steps=120"
FINER_POSTHOC+=" model.prior.langevin.step_size=0.3 train.steps=$POSTHOC_LONG_STEPS"

# One job per line: NAME CONFIG OVERRIDES...
headline_jobs() {
  for s in $SEEDS; do  # the staged EBM run in one command and its step-matched Laplace control
    echo "polymnist_ebm_staged_s$s configs/polymnist_ebm.yaml train.seed=$s train.steps=5000"
    echo "polymnist_laplace_2000_s$s configs/polymnist_laplace.yaml train.seed=$s train.steps=2000"
    echo "polymnist_ebm_fitted_s$s configs/polymnist_ebm_fitted.yaml train.seed=$s train.steps=5000 --no-samplers"
  done
  for s in $FASHION_SEEDS; do  # the fitted schedule (the higher joint coherence on PolyMNIST) and its control
    echo "fashion_ebm_fitted_s$s configs/polyfashion_ebm_fitted.yaml train.seed=$s train.steps=5000 --no-samplers"
    echo "fashion_laplace_2000_s$s configs/polyfashion_laplace.yaml train.seed=$s train.steps=2000"
  done
  for s in $MNIST_SVHN_SEEDS; do  # the same schedule on MNIST + generated street numbers, and its control
    # Without a control run, the fitted run's own eval holds the control's figures and fits the samplers.
    local control=""
    if [[ " $MNIST_SVHN_CONTROL_SEEDS " == *" $s "* ]]; then control=1; fi
    # (no trailing blank: xargs -L would join the next line to this one)
    echo "mnist_svhn_ebm_fitted_s$s configs/mnist_svhn_ebm_fitted.yaml train.seed=$s train.steps=15000${control:+ --no-samplers}"
    if [ -n "$control" ]; then
      echo "mnist_svhn_laplace_control_s$s configs/mnist_svhn_laplace_control.yaml train.seed=$s train.steps=12000"
    fi
  done
  for s in $BIRDS_SEEDS; do  # one run: its eval reads its reference stage (the Laplace control) and the samplers
    echo "birds_ebm_fitted_s$s configs/birds_ebm_fitted.yaml train.seed=$s train.steps=12000"
  done
}

archive_jobs() {
  for s in $SEEDS; do
    echo "polymnist_ebm_s$s configs/polymnist_ebm_joint.yaml train.seed=$s"
    echo "polymnist_laplace_s$s configs/polymnist_laplace.yaml train.seed=$s"
  done
  for s in $SEEDS; do  # after every Laplace run has started: each waits for its own
    echo "polymnist_ebm_posthoc_s$s configs/polymnist_ebm_joint.yaml train.seed=$s model.prior.fit=posthoc" \
      "train.init_from=$OUT/polymnist_laplace_s$s"
    echo "polymnist_ebm_posthoc_lr5e-4_l2_0_s$s configs/polymnist_ebm_joint.yaml train.seed=$s model.prior.fit=posthoc" \
      "model.prior.lr=5e-4 model.prior.energy_l2=0 train.init_from=$OUT/polymnist_laplace_s$s"
  done
  echo "polymnist_ebm_posthoc_lr5e-4_s0 configs/polymnist_ebm_joint.yaml train.seed=0 model.prior.fit=posthoc" \
    "model.prior.lr=5e-4 train.init_from=$OUT/polymnist_laplace_s0"
  for s in $FASHION_SEEDS; do
    echo "fashion_ebm_s$s configs/polyfashion_ebm_joint.yaml train.seed=$s"
    echo "fashion_laplace_s$s configs/polyfashion_laplace.yaml train.seed=$s"
  done
  echo "polymnist_ebm_gaussref_s0 configs/polymnist_ebm_joint.yaml train.seed=0 model.prior.reference=gaussian"
  for s in $SEEDS; do  # the chain that tracks a sharp energy
    echo "polymnist_ebm_posthoc_lr1e-3_K120_s0.3_s$s configs/polymnist_ebm_joint.yaml train.seed=$s $FINER_POSTHOC" \
      "train.init_from=$OUT/polymnist_laplace_s$s"
  done
  for s in $SEEDS; do  # then all of the model jointly, from that post-hoc prior (the paper's objective)
    echo "polymnist_ebm_joint_from_posthoc_s$s configs/polymnist_ebm_joint.yaml train.seed=$s model.prior.lr=1e-4" \
      "model.prior.energy_l2=0 model.prior.langevin.steps=120 model.prior.langevin.step_size=0.3" \
      "train.steps=$JOINT_FT_STEPS train.init_from=$OUT/polymnist_ebm_posthoc_lr1e-3_K120_s0.3_s$s"
  done
  for s in $FASHION_SEEDS; do
    echo "fashion_ebm_posthoc_lr1e-3_K120_s0.3_s$s configs/polyfashion_ebm_joint.yaml train.seed=$s $FINER_POSTHOC" \
      "train.init_from=$OUT/fashion_laplace_s$s"
  done
}

# train_and_eval NAME CONFIG OVERRIDES...: train (or resume) to $STEPS (or the job's own train.steps), then
# evaluate the final checkpoint.
train_and_eval() {
  local name=$1 config=$2; shift 2
  local run=$OUT/$name arg steps=$STEPS eval_args=$EVAL_ARGS
  local overrides=()
  for arg in "$@"; do
    case $arg in
      --no-samplers) eval_args="" ;;  # its encoders/decoders are another job's (the fitted schedule's Laplace
                                      # stage = the control's run): the post-hoc samplers would repeat its figures
      train.init_from=*)  # a run that starts from another (post-hoc prior, fine-tuning) waits for its eval
        until [ -f "${arg#train.init_from=}/eval/eval.json" ]; do sleep 60; done
        overrides+=("$arg") ;;
      train.steps=*) steps=${arg#train.steps=} ;;  # a job's own step count replaces $STEPS
      *) overrides+=("$arg") ;;
    esac
  done
  local rc=0
  if [ -f "$run/config.json" ]; then
    "$MMEBM" train --resume "$run" train.steps="$steps" train.threads=1 >>"$run.log" 2>&1 || rc=$?
  else
    "$MMEBM" train --config "$config" train.out_dir="$run" train.steps="$steps" train.threads=1 "${overrides[@]}" \
      >>"$run.log" 2>&1 || rc=$?
  fi
  # A run that stopped early (killed, a runaway energy, a full disk) is not evaluated: an eval of its last
  # checkpoint would pass for the finished run's figure. Rerunning the script resumes it.
  if [ $rc -ne 0 ]; then echo "FAILED: $name (mmebm train exit status $rc; see $run.log)" >&2; return 1; fi
  local data
  data=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["data"]["path"])' "$run/config.json")
  until [ -d "$data/classifiers" ]; do
    if [ -f "$data.classifiers.failed" ]; then echo "classifiers for $data failed: $data.classifiers.log" >&2; return 1; fi
    sleep 30
  done
  # Evaluate unless an eval newer than the last checkpoint exists.
  if [ ! -f "$run/eval/eval.json" ] || [ "$run/eval/eval.json" -ot "$run/checkpoints/latest" ]; then
    # shellcheck disable=SC2086  # the flag string splits into words on purpose
    OMP_NUM_THREADS=1 "$MMEBM" eval --run "$run" --num-samples "$EVAL_SAMPLES" $eval_args >>"$run.log" 2>&1
  fi
  echo "done: $name"
}
export -f train_and_eval
export MMEBM STEPS EVAL_SAMPLES EVAL_ARGS OUT

"${SUITE}_jobs" | xargs -P "$PARALLEL" -L 1 bash -c 'train_and_eval "$@"' _

wait  # the background classifier trainings (done by now: every eval waited for them)
if [ "$SUITE" = archive ]; then
  "$MMEBM" results --runs "$OUT"/*/ --out-md "$DOC.md" --out-json "$DOC.json" --img-dir "$IMG" --notes "${DOC}_notes.md"
else  # one document per data set: docs/results.* (PolyMNIST) and docs/results_fashion.* (Fashion-MNIST)
  if [ -n "$SEEDS" ]; then
    "$MMEBM" results --runs "$OUT"/polymnist_*/ --out-md "$DOC.md" --out-json "$DOC.json" --img-dir "$IMG" \
      --notes "${DOC}_notes.md"
  fi
  if [ -n "$FASHION_SEEDS" ]; then
    "$MMEBM" results --runs "$OUT"/fashion_*/ --out-md "${DOC}_fashion.md" --out-json "${DOC}_fashion.json" \
      --img-dir "${IMG}_fashion" --notes "${DOC}_fashion_notes.md"
  fi
  if [ -n "$MNIST_SVHN_SEEDS" ]; then
    "$MMEBM" results --runs "$OUT"/mnist_svhn_*/ --out-md "${DOC}_mnist_svhn.md" \
      --out-json "${DOC}_mnist_svhn.json" --img-dir "${IMG}_mnist_svhn" --notes "${DOC}_mnist_svhn_notes.md"
  fi
  if [ -n "$BIRDS_SEEDS" ]; then
    "$MMEBM" results --runs "$OUT"/birds_*/ --out-md "${DOC}_birds.md" --out-json "${DOC}_birds.json" \
      --img-dir "${IMG}_birds" --notes "${DOC}_birds_notes.md"
  fi
fi
