"""launch/slurm_multinode.sh against a real SLURM on this host (launch/slurm_local.sh): a job with a 1-minute
limit gets its signal (--signal=B:USR1@30), checkpoints, requeues itself, resumes and finishes, logging the
same losses as a run never interrupted; a second job, cancelled (scancel), leaves a run that resumes.

Minutes of wall time (SLURM signals at its 30-second checks), so it runs only with MMEBM_SLURM_TEST=1:
`launch/slurm_check.sh` runs it; it skips with the reason where SLURM cannot start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import REPO, build_tiny_polymnist, env, free_port, run_train, tiny_config

from mmebm_dist.rundir import latest_checkpoint, read_jsonl, read_train_state

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("MMEBM_SLURM_TEST") != "1",
        reason="starts a real SLURM, minutes long: MMEBM_SLURM_TEST=1 (launch/slurm_check.sh)",
    ),
]

STEPS = 1000  # ~100 s on 2 processes here: the signal comes 30-60 s into the first job
# The same layout resumes exactly (model, optimizer, every rank's RNG, data position): measured bitwise equal;
# 1e-6 leaves room for a BLAS not bitwise reproducible across processes (tests/test_checkpoint.py).
RESUME_RTOL = 1e-6


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a cluster started by launch/slurm_local.sh (stopped afterwards); skips when it cannot."""
    directory = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(REPO / "launch/slurm_local.sh"), "start", str(directory)],
                           capture_output=True, text=True, timeout=900)
    if start.returncode == 3:
        pytest.skip(start.stderr.strip().splitlines()[-1])
    assert start.returncode == 0, start.stdout + start.stderr
    yield str(directory / "slurm.conf")
    subprocess.run(["bash", str(REPO / "launch/slurm_local.sh"), "stop", str(directory)], timeout=60)


def _slurm(conf: str, *args: str) -> str:
    """A SLURM client command against ``conf``'s cluster, from the repository root (the job's submit dir)."""
    return subprocess.run(list(args), cwd=REPO, env={**env(), "SLURM_CONF": conf}, check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()


def _sbatch(conf: str, out: Path, run: Path, config: Path, *, time_limit: str) -> str:
    """Submit slurm_multinode.sh for 2 CPU processes here (the script's 8 GPUs are the fake node's)."""
    exports = ",".join(["ALL", "GPUS_PER_NODE=2", "OMP_NUM_THREADS=1", f"MAIN_PROCESS_PORT={free_port()}",
                        f"PYTHON={sys.executable}"])
    return _slurm(conf, "sbatch", "--parsable", f"--export={exports}", "--cpus-per-task=2",
                  f"--time={time_limit}", "--signal=B:USR1@30", f"--output={out}/job-%j.out",
                  str(REPO / "launch/slurm_multinode.sh"), "--config", str(config), f"train.out_dir={run}")


def _state(conf: str, job: str) -> str:
    line = _slurm(conf, "scontrol", "show", "job", job)
    return next(f.split("=", 1)[1] for f in line.split() if f.startswith("JobState="))


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(1)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    data = build_tiny_polymnist(root, modalities=2, train=64, shard_size=16)
    return tiny_config(root / "c.yaml", data, train={"steps": STEPS, "checkpoint_every": 50, "log_every": 10})


def test_time_limit_signal_checkpoint_requeue_and_exact_resume(slurm, config, tmp_path):
    run = tmp_path / "run"
    job = _sbatch(slurm, tmp_path, run, config, time_limit="1")
    log = tmp_path / f"job-{job}.out"
    _wait(lambda: log.exists() and "requeueing job" in log.read_text(errors="replace"), 240,
          "the time-limit signal")
    _slurm(slurm, "scontrol", "update", f"JobId={job}", "TimeLimit=10")  # the requeued job may finish
    stopped = read_train_state(latest_checkpoint(run)).step
    assert 0 < stopped < STEPS
    _wait(lambda: _state(slurm, job) == "COMPLETED", 400, "the requeued job to finish")
    text = log.read_text(errors="replace")
    assert text.count("nodes=1 gpus/node=2") == 2 and "signal received" in text, text[-3000:]
    assert _slurm(slurm, "scontrol", "show", "job", job).count("Restarts=1") == 1
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(10, STEPS + 1, 10))
    # exact resume: an uninterrupted run in the same layout, 50 steps past the resume point
    reference = tmp_path / "reference"
    compare = stopped + 50
    run_train(["--config", str(config), f"train.out_dir={reference}", f"train.steps={compare}"],
              launcher=["--config_file", str(REPO / "launch/accelerate/cpu_ddp_2proc.yaml"),
                        "--main_process_port", str(free_port())])
    expected = {r["step"]: r["loss"] for r in read_jsonl(reference / "metrics.jsonl")}
    logged = {r["step"]: r["loss"] for r in records}
    common = sorted(set(expected) & set(logged))
    assert common == list(range(10, compare + 1, 10))  # steps on both sides of the resume
    for step in common:
        assert logged[step] == pytest.approx(expected[step], rel=RESUME_RTOL), step
    last = common[-1]
    print(f"\nSLURM job {job}: signalled and checkpointed at step {stopped}, requeued (Restarts=1), resumed "
          f"to step {STEPS}; the losses of steps {common[0]}..{last} equal the uninterrupted run's "
          f"(rel {RESUME_RTOL}); step {last}: {logged[last]!r} vs {expected[last]!r}")


def test_cancelled_job_leaves_a_resumable_run(slurm, config, tmp_path):
    run = tmp_path / "run"
    job = _sbatch(slurm, tmp_path, run, config, time_limit="10")
    _wait(lambda: latest_checkpoint(run) is not None, 240, "a first checkpoint")
    _slurm(slurm, "scancel", job)
    _wait(lambda: _slurm(slurm, "squeue", "-h", "-j", job, "-o", "%T") == "", 120,
          "the job's processes to end")
    assert _state(slurm, job) == "CANCELLED"
    text = (tmp_path / f"job-{job}.out").read_text(errors="replace")
    assert "signal received (TERM)" in text and "not requeued" in text, text[-3000:]
    assert "Restarts=0" in _slurm(slurm, "scontrol", "show", "job", job)
    stopped = read_train_state(latest_checkpoint(run)).step
    assert 0 < stopped < STEPS
    finish = stopped + 20
    run_train(["--resume", str(run), f"train.steps={finish}"])  # one process: an elastic resume
    assert read_train_state(latest_checkpoint(run)).step == finish
    print(f"\nSLURM job {job}: cancelled after the checkpoint of step {stopped}; resumed in one process to "
          f"step {finish}")
