"""Surviving preemption, operator mistakes and damaged files: SIGTERM/SIGUSR1 stop with one checkpoint and
resume exactly, one process per run directory, overrides on resume applied or refused, a corrupt newest
checkpoint skipped, no checkpoint of runaway weights, a full disk named, a frozen rank named."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import ACCELERATE, REPO, env, free_port, run_train, tiny_config

from mmebm_dist.config import ConfigError, load_config
from mmebm_dist.rundir import complete_checkpoints, read_jsonl, read_train_state
from mmebm_dist.train.checkpoint import CheckpointError
from mmebm_dist.train.signals import EXIT_PREEMPTED, STEP_HOOKS

# As in test_checkpoint.py: a resume is bitwise exact on CPU with one thread; 1e-6 leaves room for a BLAS
# that is not bitwise reproducible across processes and is far below what a wrong state changes (> 1e-3).
RESUME_RTOL = 1e-6
KEYS = ("loss", "energy_gap", "kl_z", "lr/model", "lr/energy")
DDP = ["--config_file", str(REPO / "launch/accelerate/cpu_ddp_2proc.yaml")]


def _hooked(args: list[str], hook: str, *, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``mmebm train ARGS`` under tests/step_hook_main.py (MMEBM_TEST_HOOK=hook); returns, whatever the rc."""
    environment = env()
    environment["PYTHONPATH"] = str(REPO / "tests") + os.pathsep + environment["PYTHONPATH"]
    environment["MMEBM_TEST_HOOK"] = hook
    if launcher is None:
        cmd = [sys.executable, "-m", "step_hook_main", *args]
    else:
        cmd = [*ACCELERATE, *launcher, "--main_process_port", str(free_port()), "-m", "step_hook_main", *args]
    return subprocess.run(cmd, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


def _same_metrics(reference: Path, resumed: Path, steps: int) -> None:
    ref, res = read_jsonl(reference / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in res] == [r["step"] for r in ref] == list(range(1, steps + 1))
    for a, b in zip(ref, res, strict=True):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=RESUME_RTOL), (a["step"], key)


def _same_weights(reference: Path, resumed: Path, steps: int) -> None:
    name = f"checkpoints/step-{steps:07d}/model.pt"
    a, b = (torch.load(run / name, weights_only=True) for run in (reference, resumed))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RESUME_RTOL, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [None, DDP], ids=["single", "ddp2"])
def test_stop_signal_checkpoints_once_and_resumes_exactly(data2, tmp_path, launcher):  # noqa: F811
    """SIGTERM (single process) / SIGUSR1 on rank 1 only (DDP): every rank finishes step 3, one checkpoint
    (step 3) is written, the exit status is 75; the resumed run equals one never interrupted."""
    steps = 8
    config = tiny_config(tmp_path / "c.yaml", data2, train={"steps": steps, "checkpoint_every": 100})
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    run_train(["--config", str(config), f"train.out_dir={reference}"], launcher=launcher and [
        *launcher, "--main_process_port", str(free_port())])
    hook = "3:0:SIGTERM" if launcher is None else "3:1:SIGUSR1"
    proc = _hooked(["--config", str(config), f"train.out_dir={stopped}"], hook, launcher=launcher)
    output = proc.stdout + proc.stderr
    if launcher is None:
        assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    else:  # the launcher turns a worker's exit status into its own failure report
        assert proc.returncode != 0 and f"exitcode  : {EXIT_PREEMPTED}" in output, output[-3000:]
    assert "SIG" in output and "stopped after step 3" in output
    assert [p.name for p in complete_checkpoints(stopped)] == ["step-0000003"]
    assert [r["step"] for r in read_jsonl(stopped / "metrics.jsonl")] == [1, 2, 3]

    run_train(["--resume", str(stopped)], launcher=launcher and [*launcher, "--main_process_port",
                                                                  str(free_port())])
    _same_metrics(reference, stopped, steps)
    _same_weights(reference, stopped, steps)


@pytest.mark.slow
def test_frozen_rank_is_named_after_dist_timeout(data2, tmp_path):  # noqa: F811
    """Rank 1 stops answering after step 2: rank 0's collective times out after train.dist_timeout_s and the
    job fails with a line naming rank 1, its host and PID."""
    config = tiny_config(tmp_path / "c.yaml", data2, train={"steps": 8, "dist_timeout_s": 4})
    proc = _hooked(["--config", str(config), f"train.out_dir={tmp_path / 'run'}"], "2:1:freeze", launcher=DDP)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1 (host " in output and "stopped answering: last step 1" in output, output[-4000:]
    assert "train.dist_timeout_s=4" in output


def _train(cfg, **kwargs):
    from mmebm_dist.train.loop import train

    return train(cfg, **kwargs)


def _config(tmp_path: Path, data: Path, *overrides: str, **sections):
    return load_config(tiny_config(tmp_path / "c.yaml", data, **sections),
                       [f"train.out_dir={tmp_path / 'run'}", *overrides])


def test_second_writer_is_refused_naming_the_holder(data2, tmp_path, in_process):  # noqa: F811
    """A run directory locked by another process is refused with its host and PID; a holder that dies
    (SIGKILL) leaves no stale lock behind."""
    from mmebm_dist.train.runlock import RunDirLockedError

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mmebm_dist.train.runlock import RunLock\n"
         f"with RunLock({str(run)!r}):\n    print('locked', flush=True); time.sleep(120)"],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLockedError, match=rf"in use by host \S+ PID {holder.pid} "):
            _train(_config(tmp_path, data2, "train.steps=2"))
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert _train(_config(tmp_path, data2, "train.steps=2"))["step"] == 2  # the kernel released the lock


def test_resume_applies_optimizer_overrides_and_refuses_model_ones(data2, tmp_path, in_process):  # noqa: F811
    """``--resume RUN model.prior.lr=...`` reaches the optimizer (metrics log the new lr on the old
    schedule); a change of the model's shape is refused naming the key, before anything is written."""
    from mmebm_dist.commands.train import resolve_config

    optim = {"lr_decay": 0.5, "lr_decay_every": 2}
    _train(_config(tmp_path, data2, "train.steps=4", optim=optim))
    run = tmp_path / "run"

    def resume(*overrides: str):
        args = type("Args", (), {"config": None, "resume": str(run), "overrides": list(overrides)})()
        return _train(resolve_config(args)[0], resume=True)

    saved = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"model\.latent_dim cannot change on resume .* has 4, asked 8"):
        resume("model.latent_dim=8", "train.steps=6")
    assert (run / "config.json").read_text() == saved
    resume("model.prior.lr=1e-4", "optim.lr=2e-3", "model.prior.betas=[0.9,0.99]", "train.steps=6")
    records = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    assert records[4]["lr/energy"] == pytest.approx(1e-3 * 0.5**2)  # before: tiny_config's prior lr
    assert records[5]["lr/energy"] == pytest.approx(1e-4 * 0.5**2)  # after: the override, same schedule
    assert records[6]["lr/model"] == pytest.approx(2e-3 * 0.5**3)
    assert json.loads((run / "config.json").read_text())["model"]["prior"]["lr"] == 1e-4


def test_corrupt_newest_checkpoint_falls_back_and_is_named(data2, tmp_path, in_process, caplog):  # noqa: F811
    """A truncated file in the newest checkpoint is named and the resume continues from the one before;
    ``--checkpoint`` picks one; a corrupt picked one is an error naming the file."""
    cfg = _config(tmp_path, data2, "train.steps=6", "train.checkpoint_every=2")
    _train(cfg)
    ckpts = complete_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-0000002", "step-0000004", "step-0000006"]
    damaged = next(p for p in sorted(ckpts[-1].iterdir()) if p.name.startswith("optimizer"))
    damaged.write_bytes(damaged.read_bytes()[:100])
    (ckpts[1] / "train_state.json").write_text('{"step": 4, "epo')

    with pytest.raises(CheckpointError, match=r"step-0000004 does not load: .*train_state.json"):
        _train(cfg, resume=True, checkpoint="step-0000004")
    caplog.set_level("WARNING")
    assert _train(cfg, resume=True)["step"] == 6
    log = caplog.text
    assert f"{damaged}: not a torch zip archive" in log and "train_state.json: JSONDecodeError" in log
    assert "resuming from" in log and "step-0000002" in log
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert "step-0000006.abandoned" in names and "step-0000004.abandoned" in names
    assert [r["step"] for r in read_jsonl(tmp_path / "run/metrics.jsonl")] == list(range(1, 7))

    _train(cfg, resume=True, checkpoint="step-0000002")  # a good one, picked by name
    assert read_train_state(complete_checkpoints(tmp_path / "run")[-1]).step == 6


def test_checkpoint_files_are_fsynced_before_the_rename(data2, tmp_path, in_process, monkeypatch):  # noqa: F811
    from mmebm_dist.train import checkpoint

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (events.append(("replace", str(b))),
                                                                real_replace(a, b))[1])
    _train(_config(tmp_path, data2, "train.steps=2", "train.checkpoint_every=2"))
    rename = events.index(("replace", str(tmp_path / "run/checkpoints/step-0000002")))
    synced = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    assert {"model.pt", "train_state.json", ".tmp-step-0000002"} <= synced
    assert any(name.startswith("optimizer") for name in synced)


def test_runaway_weights_are_never_checkpointed(data2, tmp_path, in_process):  # noqa: F811
    """Step 4's optimizer step blows the energy weights up (|w| = 1e30): the checkpoint due at step 4 is not
    written, and the error names the last good one (step 2)."""
    from mmebm_dist.models.multimodal_vae import RunawayError

    def blow_up(step: int, model: torch.nn.Module) -> None:
        if step == 4:
            with torch.no_grad():
                for p in model.energy.parameters():
                    p.fill_(1e30)

    STEP_HOOKS.append(blow_up)
    try:
        with pytest.raises(RunawayError, match=r"step 4: .*last good checkpoint is .*step-0000002"):
            _train(_config(tmp_path, data2, "train.steps=6", "train.checkpoint_every=2"))
    finally:
        STEP_HOOKS.remove(blow_up)
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-0000002"]
    assert not list((tmp_path / "run/checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_full_disk_is_named_and_the_previous_checkpoint_kept(data2, tmp_path, in_process, monkeypatch,  # noqa: F811
                                                             writer):
    """The writer (torch.save, or accelerate's safetensors writer of the model) failing for lack of space at
    step 4: the error names the checkpoint and gives a hint; step 2 is byte-identical, no temp directory."""
    import accelerate.utils.other as accelerate_io
    from safetensors import SafetensorError

    module, name = (torch, "save") if writer == "torch" else (accelerate_io, "safe_save_file")
    real_save, before = getattr(module, name), {}
    cfg = _config(tmp_path, data2, "train.steps=4", "train.checkpoint_every=2")
    run = tmp_path / "run"
    previous = run / "checkpoints/step-0000002"

    def full_disk(obj, f, *args, **kwargs):
        if ".tmp-step-0000004" in str(f):
            before.update({p.name: p.read_bytes() for p in previous.iterdir()})
            if writer == "torch":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(module, name, full_disk)
    with pytest.raises(OSError, match=r"No space left on device while writing .*step-0000004 \(the previous "
                       r"checkpoint .*step-0000002 is untouched\); free space .*keep_checkpoints"):
        _train(cfg)
    assert [p.name for p in complete_checkpoints(run)] == ["step-0000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert before and before == {p.name: p.read_bytes() for p in previous.iterdir()}
    monkeypatch.setattr(module, name, real_save)
    assert _train(cfg, resume=True)["step"] == 4  # and it resumes from there


def test_deepspeed_checkpoint_reader_refuses_pickled_code(tmp_path):
    """Inside safe_deepspeed_loads, DeepSpeed's reader unpickles with weights_only=True: a planted payload
    is refused and does not run."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from mmebm_dist.train.checkpoint import safe_deepspeed_loads

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    planted = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": Payload()}, planted)
    with safe_deepspeed_loads(), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        TorchCheckpointEngine().load(str(planted))
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(2)}}, planted)
    with safe_deepspeed_loads():
        assert torch.equal(TorchCheckpointEngine().load(str(planted))["module"]["w"], torch.ones(2))


def _fake_slurm(bin_dir: Path) -> None:
    """``srun`` that records its arguments, says it started and exits 75 on SIGUSR1 (as the training does),
    and ``scontrol`` that records a requeue."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "$@" > "$FAKE_SLURM/srun.args"\n'
        '[ -n "$FAKE_SRUN_EXIT" ] && exit "$FAKE_SRUN_EXIT"\n'
        'sleep 60 > /dev/null 2>&1 &\ntrap "kill $!; exit 75" USR1\ntouch "$FAKE_SLURM/started"\nwait\n'
    )
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [ "$1" = show ]; then echo node0; else echo "$@" >> "$FAKE_SLURM/scontrol.log"; fi\n'
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)


def test_slurm_script_forwards_the_signal_requeues_and_resumes(tmp_path):
    """launch/slurm_multinode.sh: SIGUSR1 to the batch shell reaches srun, the job requeues itself, and the
    requeued job (SLURM_RESTART_COUNT=1) resumes the run directory instead of starting over."""
    import time

    fake = tmp_path / "fake"
    _fake_slurm(tmp_path / "bin")
    fake.mkdir()
    run = tmp_path / "run"
    path = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    environment = {**env(), "PATH": path, "FAKE_SLURM": str(fake), "SLURM_SUBMIT_DIR": str(REPO),
                   "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1", "SLURM_JOB_ID": "42",
                   "GPUS_PER_NODE": "1", "PYTHON": sys.executable}
    args = ["--config", "configs/tiny.yaml", f"train.out_dir={run}"]
    shell = subprocess.Popen(["bash", str(REPO / "launch/slurm_multinode.sh"), *args], cwd=REPO,
                             env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300  # the script first imports the package to find RUN_DIR
    while not (fake / "started").exists() and shell.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # waits for the fake srun to start; the signal's effect is not timed
    assert (fake / "started").exists(), shell.communicate(timeout=60)[0] if shell.poll() is not None else ""
    shell.send_signal(signal.SIGUSR1)
    output = shell.communicate(timeout=60)[0]
    assert shell.returncode == EXIT_PREEMPTED, output
    assert (fake / "scontrol.log").read_text().split() == ["requeue", "42"]
    assert "--config configs/tiny.yaml" in (fake / "srun.args").read_text()

    run.mkdir()
    (run / "config.json").write_text("{}")
    requeued = subprocess.run(["bash", str(REPO / "launch/slurm_multinode.sh"), *args], cwd=REPO,
                              env={**environment, "SLURM_RESTART_COUNT": "1", "FAKE_SRUN_EXIT": "0"},
                              capture_output=True, text=True, timeout=120)
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    assert (fake / "scontrol.log").read_text().split() == ["requeue", "42"]  # no second requeue
    recorded = (fake / "srun.args").read_text().split()
    assert recorded[-2:] == ["--resume", str(run)], recorded


def test_resume_changes_classifies_keys():
    """Allowed changes are returned, a field missing from an older run's config is no change, and a model
    key is refused by name."""
    from mmebm_dist.config import Config, config_to_dict
    from mmebm_dist.train.resume import resume_changes

    saved = json.loads(json.dumps(config_to_dict(Config())))
    del saved["train"]["dist_timeout_s"]  # a run started before the field existed
    cfg = Config()
    cfg.train.steps, cfg.model.prior.lr, cfg.model.prior.langevin.step_size = 5000, 1e-5, 0.2
    assert set(resume_changes(saved, cfg, "ckpt")) == {"train.steps", "model.prior.lr",
                                                        "model.prior.langevin.step_size"}
    cfg.train.seed = 3
    with pytest.raises(ConfigError, match=r"^train\.seed cannot change on resume \(ckpt has 0, asked 3\)"):
        resume_changes(saved, cfg, "ckpt")


def test_laggard_description_names_the_rank_behind(tmp_path):
    """Heartbeats of 3 ranks: the waiting rank names the one behind; the stuck rank says it is behind."""
    from mmebm_dist.train.heartbeat import Heartbeat, describe_laggards

    beats = [Heartbeat(tmp_path, rank, 3, timeout_s=60) for rank in range(3)]
    for hb, step in zip(beats, (5, 4, 5), strict=True):
        hb.start(step)
    try:
        assert describe_laggards(tmp_path / "heartbeat", 3, 0, 5).startswith("rank 1 (host ")
        assert "stopped answering: last step 4" in describe_laggards(tmp_path / "heartbeat", 3, 0, 5)
        assert "rank 1 (this process" in describe_laggards(tmp_path / "heartbeat", 3, 1, 4)
        (tmp_path / "heartbeat/rank-2").unlink()
        assert "rank 2 never wrote" in describe_laggards(tmp_path / "heartbeat", 3, 0, 5)
    finally:
        for hb in beats:
            hb.__exit__()
