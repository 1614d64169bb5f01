#!/usr/bin/env bash
# One GPU check, at most 8 minutes on any CUDA machine: the GPU tests, the kernel table (Triton Langevin kernels:
# resident vs streaming, IEEE fp32 / bf16 dots, batch 16 / 1,024 / 4,096), the backend table (bench
# langevin), the training-step table (eager vs captured train.compile=reduce-overhead, EBM vs Laplace prior)
# and the loader's samples/s. Every section runs under `timeout` (its own limit, cut to what is left of the
# 8 minutes); a failed or timed-out section is recorded and the script goes on. Logs: docs/bench/<gpu>_check_*.log
# (<gpu>: the GPU's name, e.g. h200) and a summary, <gpu>_check_summary.log. Exit status 1 if any section failed.
#
# Usage: bash launch/gpu_check.sh [--dry-run]
#   --dry-run  no GPU needed: checks every section's command line against the real argument parsers and
#              collects the selected tests, writing nothing under docs/bench (logs go to $OUT or a temp dir).
# Environment: PYTHON (default python3), DATA (a shard directory for the loader section; default
# data/polymnist, else a small GENERATED birds set is built in a temp dir), BUDGET_S (default 480), SECTIONS (the
# sections to run, in the script's order; default: env train_eager train_captured langevin kernels data pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
BUDGET_S=${BUDGET_S:-480}
START=$SECONDS
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

if [ $DRY = 1 ]; then
    GPU=dryrun
    OUT=${OUT:-$(mktemp -d)}
else
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr 'A-Z' 'a-z' \
        | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/_/g' -e 's/_$//')
    OUT=${OUT:-docs/bench}
fi
mkdir -p "$OUT"
SUMMARY="$OUT/${GPU}_check_summary.log"
: >"$SUMMARY"
failed=0
SECTIONS=${SECTIONS:-env train_eager train_captured langevin kernels data pytest}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

# section NAME LIMIT_S CMD...: run CMD under timeout into $OUT/<gpu>_check_NAME.log, record rc and seconds.
section() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    local log="$OUT/${GPU}_check_${name}.log" rc=0 t0=$SECONDS
    [ "$limit" -gt "$left" ] && limit=$left
    [ $DRY = 1 ] && limit=600  # parsing only: no budget, and a loaded machine may take minutes to import
    if [ "$limit" -le 5 ]; then
        echo "$name: SKIPPED (the ${BUDGET_S} s budget is spent)" | tee -a "$SUMMARY"
        failed=1
        return 0
    fi
    echo "=== $name ($(date -u +%T), limit ${limit}s): $*"
    { echo "# $(date -u +%FT%TZ) limit ${limit}s: $*"; } >"$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
    grep -v -E '^\s*$|it/s\]$|s/it\]$' "$log" | tail -n 40 || true
    local verdict=ok
    [ $rc -eq 124 ] && verdict="TIMED OUT"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAILED rc=$rc"
    [ $rc -ne 0 ] && failed=1
    echo "$name: $verdict in $((SECONDS - t0)) s (limit ${limit} s), log $log" | tee -a "$SUMMARY"
}

# In a dry run every mmebm command is only parsed (the real parser, so a wrong flag fails here too).
MMEBM=("$PY" -m mmebm_dist.cli)
if [ $DRY = 1 ]; then
    MMEBM=("$PY" -c 'import sys; from mmebm_dist.cli import build_parser
argv = sys.argv[1:]; build_parser(argv).parse_args(argv); print("parsed:", " ".join(argv))')
fi

# Cheap, informative sections first; the test run last takes what is left. On the H200 of 2026-12-04 every
# Triton kernel compiled in ~4 s (gVisor): the first check's 18-configuration tile grid, the full test selection
# and the backend table each timed out with nothing printed, so the grid is the defaults' neighbourhood.
if [ $DRY = 0 ] && want env; then
    section env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
        && $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \
torch.cuda.get_device_name(), torch.cuda.get_device_capability())'"
fi

# Eager step (with its Laplace-prior twin: the EBM overhead), then the captured step (CUDA graphs). A staged
# config is timed as its joint stage (mmebm_dist.bench.train_step.timed_config).
want train_eager && section train_eager 110 "${MMEBM[@]}" bench train --config configs/polymnist_ebm.yaml \
    --synthetic --processes 1 --steps 20 --warmup 3 --threads 8
want train_captured && section train_captured 120 "${MMEBM[@]}" bench train --config configs/polymnist_ebm.yaml \
    --synthetic --processes 1 --steps 20 --warmup 5 --threads 8 train.compile=reduce-overhead
want langevin && section langevin 90 "${MMEBM[@]}" bench langevin --batch 16 1024 --backends torch triton \
    --repeats 10 --long-steps 0 --no-memory --threads 8
want kernels && section kernels 100 "${MMEBM[@]}" bench kernel-tiles --batch 16 1024 4096 --precisions ieee bf16 \
    --kernels resident streaming --rows 32 --tiles 16x64x32 --warps 4 --repeats 10

if want data; then
    DATA=${DATA:-data/polymnist}
    if [ ! -f "$DATA/manifest.json" ]; then
        DATA=$(mktemp -d)/birds
        section data_build 30 "${MMEBM[@]}" data birds --out "$DATA" --num-train 4096 --num-test 64
    fi
    section data 30 "${MMEBM[@]}" bench data --data "$DATA" --batch-size 128 --batches 30 --workers 0,2,4
fi

# The CUDA-graph and hardware tests first: at ~4 s per kernel compile the kernels' cases may not all fit.
PYTEST=("$PY" -m pytest -v -p no:cacheprovider -o addopts="" tests/test_capture.py tests/test_hardware.py
        tests/test_kernels_langevin.py tests/test_langevin.py -k "triton or gpu or cuda or resident or precision or auto")
[ $DRY = 1 ] && PYTEST+=(--collect-only)
want pytest && section pytest $BUDGET_S "${PYTEST[@]}"

echo "=== $((SECONDS - START)) s in all; summary $SUMMARY"
cat "$SUMMARY"
exit $failed
