#!/usr/bin/env bash
# Convenience wrapper around `mmebm train` / `accelerate launch -m mmebm_dist.train`.
# Usage: launch/train.sh LAUNCH (--config CONFIG | --resume RUN_DIR) [--trace-samples] [key=value ...]
#   LAUNCH: "single" (one plain process), or a file of launch/accelerate/ without ".yaml":
#           cpu_ddp_2proc, cpu_deepspeed_2proc, gpu_1, gpu_8_ddp, gpu_8_zero2_bf16
# Examples:
#   launch/train.sh single --config configs/tiny.yaml data.path=data/polymnist train.out_dir=runs/tiny
#   launch/train.sh cpu_ddp_2proc --config configs/polymnist_small.yaml train.out_dir=runs/ddp
#   launch/train.sh cpu_ddp_2proc --resume runs/ddp train.steps=4000
# Environment: PYTHON (default .venv/bin/python when present), THREADS (torch threads per process; default on
# CPU: cores / processes), EXTRA_LAUNCH_ARGS (more `accelerate launch` flags, e.g. "--main_process_port 29600").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
LAUNCH=$1; shift
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

if [ "$LAUNCH" = single ]; then
  export OMP_NUM_THREADS=${THREADS:-${OMP_NUM_THREADS:-$(nproc)}}
  exec "$PYTHON" -m mmebm_dist.train "$@"
fi

YAML=launch/accelerate/$LAUNCH.yaml
if [ ! -f "$YAML" ]; then
  echo "launch/train.sh: no $YAML; choose single or one of: $(cd launch/accelerate && ls *.yaml | sed 's/.yaml//' | tr '\n' ' ')" >&2
  exit 2
fi
PROCS=$(awk '/^num_processes:/ {print $2}' "$YAML")
# One process per core share by default, so that N processes do not each start one thread per core.
export OMP_NUM_THREADS=${THREADS:-${OMP_NUM_THREADS:-$(( $(nproc) / PROCS > 0 ? $(nproc) / PROCS : 1 ))}}
# shellcheck disable=SC2086
exec "$PYTHON" -m accelerate.commands.launch --config_file "$YAML" ${EXTRA_LAUNCH_ARGS:-} -m mmebm_dist.train "$@"
