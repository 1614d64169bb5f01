#!/usr/bin/env bash
# Validate and time the Langevin kernels on a CUDA machine: the kernel and dispatcher tests on the GPU (full-size
# shapes included), the tile sweep, the backend benchmark (autograd vs fused torch vs Triton on the same GPU) and
# one training-step benchmark with synthetic batches. Each stage has its own time limit and the script goes on
# past a failed stage; logs go to $OUT (default runs/gpu_check). Usage: bash launch/gpu_check.sh
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
stage() {  # stage NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    grep -v -E '^\s*$|it/s\]$|s/it\]$' "$OUT/$name.log" | tail -n 60
    echo "=== $name: rc=$rc in $((SECONDS - start)) s"
    [ $rc -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
stage pytest 170 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_langevin.py \
    tests/test_kernels_langevin.py -k "triton or gpu or not torch_matches"
stage tiles 120 $PY -m mmebm_dist.cli bench kernel-tiles --batch 16 256 1024 4096 --repeats 10
stage langevin 100 $PY -m mmebm_dist.cli bench langevin --batch 16 256 1024 4096 --repeats 10 --threads 8
stage langevin_wide 60 $PY -m mmebm_dist.cli bench langevin --batch 256 4096 --latent 128 --hidden 512 --layers 4 \
    --activation gelu --repeats 5 --long-steps 0 --threads 8
stage train 90 $PY -m mmebm_dist.cli bench train --config configs/polymnist_ebm.yaml --synthetic --processes 1 \
    --steps 10 --warmup 3 --threads 8
exit $status
