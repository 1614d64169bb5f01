"""Training-side reliability (issue 33): every checkpoint file checked before a resume trusts it, stale
half-written checkpoints cleared, the run lock never inherited by forked workers, Ctrl-C stopping like
SIGTERM."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, env, tiny_config

from mmebm_dist.config import load_config
from mmebm_dist.rundir import complete_checkpoints, read_jsonl
from mmebm_dist.train.checkpoint import FILE_LIST, CheckpointError
from mmebm_dist.train.runlock import RunLock
from mmebm_dist.train.signals import EXIT_PREEMPTED, StopRequest

KEYS = ("loss", "energy_gap", "kl_z", "lr/model", "lr/energy")


def _train(cfg, **kwargs):
    from mmebm_dist.train.loop import train

    return train(cfg, **kwargs)


def _config(tmp_path: Path, data: Path, *overrides: str):
    return load_config(tiny_config(tmp_path / "c.yaml", data),
                       [f"train.out_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("damage", ["deleted", "empty-dict", "empty-dict-no-list", "optimizer-empty-dict"])
def test_every_checkpoint_file_is_checked_and_the_resume_stays_exact(data2, tmp_path, in_process, caplog,  # noqa: F811
                                                                      damage):
    """The newest checkpoint's RNG states deleted or replaced by ``torch.save({})`` (with or without the
    file list), or its optimizer state replaced: that checkpoint is refused naming the file, the resume
    falls back to the older one, and the steps it recomputes equal the uninterrupted run's."""
    cfg = _config(tmp_path, data2, "train.steps=4", "train.checkpoint_every=2")
    _train(cfg)
    run = tmp_path / "run"
    reference = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    newest = complete_checkpoints(run)[-1]
    target = newest / ("optimizer.bin" if damage.startswith("optimizer") else "random_states_0.pkl")
    if damage == "deleted":
        target.unlink()
    else:
        torch.save({}, target)
    if damage == "empty-dict-no-list":
        (newest / FILE_LIST).unlink()
    caplog.set_level("WARNING")
    assert _train(cfg, resume=True)["step"] == 4
    no_streams = "random_states_0.pkl: RNG states without random_state"
    expected = {"deleted": "random_states_0.pkl is missing", "empty-dict": no_streams,
                "empty-dict-no-list": no_streams,
                "optimizer-empty-dict": "optimizer.bin has "}[damage]
    assert f"checkpoint {newest} does not load" in caplog.text and expected in caplog.text, caplog.text
    assert "step-0000002" in caplog.text
    resumed = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    for step in (3, 4):
        for key in KEYS:
            assert resumed[step][key] == reference[step][key], (step, key)


def test_checkpoint_without_its_file_list_entries_is_refused_by_name(data2, tmp_path, in_process):  # noqa: F811
    """``--checkpoint NAME`` of a checkpoint missing a listed file is an error naming that file."""
    cfg = _config(tmp_path, data2, "train.steps=2", "train.checkpoint_every=2")
    _train(cfg)
    ckpt = complete_checkpoints(tmp_path / "run")[-1]
    (ckpt / "scheduler.bin").unlink()
    with pytest.raises(CheckpointError, match=r"step-0000002 does not load: .*scheduler\.bin is missing"):
        _train(cfg, resume=True, checkpoint="step-0000002")


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_half_written_first_checkpoint_is_cleared(data2, tmp_path, in_process, caplog, resume):  # noqa: F811
    """A kill while the first checkpoint was written leaves only ``.tmp-step-0000002``: both a fresh run and
    ``--resume`` remove it (with a log line) and train, instead of refusing the directory."""
    cfg = _config(tmp_path, data2, "train.steps=2", "train.checkpoint_every=2")
    _train(cfg)
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    (checkpoints / "step-0000002").rename(checkpoints / ".tmp-step-0000002")
    (checkpoints / "latest").unlink()
    if not resume:
        (run / "metrics.jsonl").unlink()
    in_process()
    caplog.set_level("WARNING")
    assert _train(cfg, resume=resume)["step"] == 2
    assert f"removing {checkpoints / '.tmp-step-0000002'}" in caplog.text
    assert [p.name for p in checkpoints.iterdir() if p.name != "latest"] == ["step-0000002"]


def _signal_then_pause(started) -> None:
    started.set()
    signal.pause()


def test_forked_child_does_not_keep_the_run_lock(tmp_path):
    """A forked child (as a DataLoader worker is) outliving the lock's holder does not hold the lock."""
    run = tmp_path / "run"
    context = multiprocessing.get_context("fork")
    started = context.Event()
    child = context.Process(target=_signal_then_pause, args=(started,))
    with RunLock(run):
        child.start()
        assert started.wait(60)  # the child runs (its fork handlers have run) before the holder leaves
    try:
        with RunLock(run):  # raised RunDirLockedError naming this PID while the child lived, before the fix
            pass
    finally:
        child.kill()
        child.join()


def test_stop_request_turns_sigint_into_a_flag_and_ignores_repeats():
    """SIGINT sets the flag (no KeyboardInterrupt); after a stop, further stop signals are ignored until
    the process exits, so none can kill the stop checkpoint or the teardown."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.received == signal.SIGINT
            assert stop.agreed(torch.device("cpu")) == "SIGINT"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the test process survives
        with StopRequest() as stop:
            pass
        assert stop.received is None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_ctrl_c_stops_with_one_checkpoint_and_exit_75(data2, tmp_path):  # noqa: F811
    """SIGINT at step 3, then SIGTERM and SIGINT again while the stop checkpoint is written: exit 75, one
    checkpoint (step 3), no KeyboardInterrupt traceback."""
    config = tiny_config(tmp_path / "c.yaml", data2, train={"steps": 8, "checkpoint_every": 100})
    environment = env()
    environment["PYTHONPATH"] = str(REPO / "tests") + os.pathsep + environment["PYTHONPATH"]
    environment["MMEBM_TEST_HOOK"] = "3:0:SIGINT+again"
    proc = subprocess.run([sys.executable, "-m", "step_hook_main", "--config", str(config),
                           f"train.out_dir={tmp_path / 'run'}"], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "KeyboardInterrupt" not in output and "SIGINT: stopped after step 3" in output
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-0000003"]
