#!/usr/bin/env bash
# The real-SLURM test, kept out of `make test` (minutes of wall time: SLURM signals at its 30-second checks):
# starts a one-host SLURM (launch/slurm_local.sh; installs slurm-wlm and munge with apt-get when root), runs
# launch/slurm_multinode.sh jobs through it (time-limit signal -> checkpoint -> requeue -> exact resume; a
# cancelled job's run resumed), prints what happened. Skips, saying why, where SLURM cannot start.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
MMEBM_SLURM_TEST=1 exec "$PY" -m pytest -q -s -rs tests/test_slurm.py "$@"
