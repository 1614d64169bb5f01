#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, ranks from SLURM's environment.
# Submit from the repository root (the run directory must be on a filesystem all nodes share):
#   sbatch --nodes=4 launch/slurm_multinode.sh --config configs/polymnist_ebm.yaml train.out_dir=runs/ebm4x8
#   sbatch --nodes=4 launch/slurm_multinode.sh --resume runs/ebm4x8          # continue by hand
# Time limit: SLURM signals the batch shell (USR1) 120 s before the limit; the shell forwards SIGUSR1 to every
# training process, which finish their step, write one checkpoint and exit 75; the job then requeues itself
# and the requeued run resumes RUN_DIR (computed from the arguments once, before the first start).
# SIGTERM (scancel, or a preemption: under PreemptMode=REQUEUE SLURM requeues the job itself) is forwarded the
# same way but the job does not requeue itself: a cancelled job stays cancelled and leaves a resumable run. CHECKPOINT_GRACE_S (default 110): how long the launcher lets
# the workers finish before killing them; keep it below the --signal lead time.
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE or 8), LAUNCH_YAML (default
# launch/accelerate/multinode_template.yaml; its machine/IP/port/process values are overridden by the flags
# below, so the template's placeholders need no editing), MAIN_PROCESS_PORT (default 29500), PYTHON.
# For DeepSpeed across nodes, use a DEEPSPEED YAML with `deepspeed_multinode_launcher: standard` under
# deepspeed_config (accelerate otherwise tries to start the other nodes itself with pdsh).
#SBATCH --job-name=mmebm-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PROCESS_IP GPUS_PER_NODE
export MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
export LAUNCH_YAML=${LAUNCH_YAML:-launch/accelerate/multinode_template.yaml}
export PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# The launcher forwards SIGUSR1 too (torch elastic handles only TERM/INT/HUP/QUIT by default) and waits
# this long for the workers' checkpoint before killing them.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${CHECKPOINT_GRACE_S:-110}
# A requeued job continues its run directory instead of starting over.
RUN_DIR=$("$PYTHON" -c 'import sys; from mmebm_dist.commands.train import run_dir_of; print(run_dir_of(sys.argv[1:]))' "$@")
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && [ -f "$RUN_DIR/config.json" ]; then
  set -- --resume "$RUN_DIR"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE : 1 ))}
echo "nodes=$SLURM_NNODES gpus/node=$GPUS_PER_NODE main=$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT yaml=$LAUNCH_YAML"

# One task per node; SLURM_NODEID is read inside each task (single quotes), giving machine ranks 0..N-1.
# srun runs in the background so that the shell can take SLURM's signal and forward it to the tasks.
stop_requested=""  # the signal that asked for a checkpoint: USR1 (time limit) or TERM (scancel, preemption)
srun_pid=""
# A signal that lands before srun_pid is set (between the fork and the assignment) is forwarded just after it.
forward() {
  stop_requested=$1
  echo "signal received ($1): asking every rank to checkpoint"
  if [ -n "$srun_pid" ]; then kill -USR1 "$srun_pid"; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
srun --kill-on-bad-exit=1 bash -c '
  exec "$PYTHON" -m accelerate.commands.launch --config_file "$LAUNCH_YAML" \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
    --num_processes $(( SLURM_NNODES * GPUS_PER_NODE )) \
    -m mmebm_dist.train "$@"' bash "$@" &
srun_pid=$!
if [ -n "$stop_requested" ]; then kill -USR1 "$srun_pid"; fi
while true; do
  wait "$srun_pid" && status=0 || status=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # still running: the wait was cut short by a trapped signal
done
# srun may exit just after a trapped signal cut that wait short (status 128 + signal, not srun's): bash keeps
# the status of a child it reaped, so ask once more (127: bash no longer knows the pid; keep what we have).
final=0
wait "$srun_pid" 2>/dev/null || final=$?
if [ "$final" -ne 127 ]; then status=$final; fi
if [ "$stop_requested" = USR1 ]; then
  echo "stopped for the time limit (status $status); requeueing job $SLURM_JOB_ID to resume $RUN_DIR"
  scontrol requeue "$SLURM_JOB_ID"
elif [ "$stop_requested" = TERM ]; then
  echo "stopped by SIGTERM (status $status), not requeued; continue with: sbatch $0 --resume $RUN_DIR"
fi
exit "$status"
