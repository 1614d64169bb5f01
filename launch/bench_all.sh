#!/usr/bin/env bash
# Every CPU benchmark of the project, each output saved unedited with its command line as the first line:
#   $DIR/cpu_langevin.log      mmebm bench langevin (backends vs autograd, the matmul roofs, memory vs K)
#   $DIR/cpu_train.log         mmebm bench train, 1 and 2 processes, EBM vs Laplace prior (polymnist_ebm.yaml)
#   $DIR/cpu_train_zero3.log   the same step under DeepSpeed ZeRO-3 with 2 processes
#   $DIR/cpu_data.log          mmebm bench data (loader samples/s with 0, 1, 2 workers)
#   $DIR/cpu_levers.log        launch/bench_levers.sh (issue 5's speed levers on the reference network)
# Run it on a quiet machine (nothing else on the cores): the figures are wall-clock throughput.
# Usage: launch/bench_all.sh [DIR]   (default docs/bench)
set -euo pipefail
DIR=${1:-docs/bench}
MMEBM=${MMEBM:-.venv/bin/mmebm}
mkdir -p "$DIR"

record() {  # record NAME CMD...: run CMD, keep "$ CMD" and its stdout (progress bars on stderr are dropped)
  local name=$1; shift
  { echo "\$ $* ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(lscpu | sed -n "s/^Model name: *//p"))"; "$@"; } >"$DIR/$name.log.tmp"
  mv "$DIR/$name.log.tmp" "$DIR/$name.log"
  cat "$DIR/$name.log"
}

ZERO3=$(mktemp --suffix=.yaml)
trap 'rm -f "$ZERO3"' EXIT
sed 's|launch/deepspeed/zero2.json|launch/deepspeed/zero3.json|' launch/accelerate/cpu_deepspeed_2proc.yaml >"$ZERO3"

record cpu_langevin "$MMEBM" bench langevin
record cpu_train "$MMEBM" bench train --config configs/polymnist_ebm.yaml --steps 10 --warmup 2
record cpu_train_zero3 "$MMEBM" bench train --config configs/polymnist_ebm.yaml --steps 10 --warmup 2 \
  --processes 2 --no-laplace --accelerate-config "$ZERO3"
record cpu_data "$MMEBM" bench data --data data/polymnist
record cpu_levers env OUT="$DIR/cpu_levers.jsonl" bash launch/bench_levers.sh
