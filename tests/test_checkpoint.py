"""Checkpoints: atomic layout, partial directories never loaded, exact resume of a run killed by SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, build_tiny_polymnist, env, run_train, tiny_config

from mmebm_dist.rundir import (
    STATE_FILE,
    TrainState,
    complete_checkpoints,
    latest_checkpoint,
    read_jsonl,
    read_train_state,
    truncate_jsonl,
)

# Relative tolerance on logged losses after a resume. Measured: bitwise equal on CPU with one thread (model,
# optimizer and RNG states are restored exactly); 1e-6 leaves room for a BLAS that is not bitwise reproducible
# across processes, and is far below the change a wrong RNG state or data position causes (> 1e-3).
RESUME_RTOL = 1e-6


def _fake_checkpoint(run: Path, step: int, *, complete: bool) -> Path:
    name = f"step-{step:07d}" if complete else f".tmp-step-{step:07d}"
    path = run / "checkpoints" / name
    path.mkdir(parents=True)
    if complete:
        state = TrainState(step=step, epoch=0, epoch_batch=step, data_order={}, config={})
        (path / STATE_FILE).write_text(json.dumps(state.__dict__))
    return path


def test_partial_checkpoint_is_never_picked(tmp_path):
    """A temp directory (killed mid-write) is ignored even when newer, and even if `latest` names it."""
    _fake_checkpoint(tmp_path, 4, complete=True)
    _fake_checkpoint(tmp_path, 8, complete=True)
    _fake_checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoints/latest").write_text(".tmp-step-0000012\n")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-0000004", "step-0000008"]
    assert latest_checkpoint(tmp_path).name == "step-0000008"
    assert read_train_state(latest_checkpoint(tmp_path)).step == 8
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        read_train_state(tmp_path / "checkpoints/.tmp-step-0000012")
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_truncate_jsonl_drops_later_steps_and_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"event": "start"}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert truncate_jsonl(path, 2) == 3
    assert read_jsonl(path) == [{"step": 1}, {"event": "start"}, {"step": 2}]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        truncate_jsonl(path, 5)


def test_resume_mid_epoch_replans_a_new_split_and_refuses_a_new_order(tmp_path):
    """Mid-epoch, a new world size / workers / batch size closes the epoch's segment (the rest is re-planned);
    a new seed, shuffle or data set is refused naming the key; at an epoch boundary anything may change."""
    from mmebm_dist.train.elastic import continue_epoch

    order = {"manifest_hash": "a", "batch_size": 8, "num_workers": 0, "seed": 0, "world_size": 2}
    mid = TrainState(step=3, epoch=1, epoch_batch=3, data_order=order, config={})
    continue_epoch(mid, dict(order), tmp_path)
    assert (mid.epoch_batch, mid.epoch_segments) == (3, [])
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        continue_epoch(mid, {**order, "world_size": 1, "seed": 1}, tmp_path)
    continue_epoch(mid, {**order, "world_size": 1}, tmp_path)
    assert mid.epoch_batch == 0
    assert mid.epoch_segments == [{"world_size": 2, "num_workers": 0, "batch_size": 8, "batches": 3}]
    boundary = TrainState(step=4, epoch=2, epoch_batch=0, data_order=order, config={})
    continue_epoch(boundary, {**order, "world_size": 1, "seed": 1}, tmp_path)  # a new epoch: a new split
    assert boundary.epoch_segments == []


def _samples_by_step(run: Path) -> dict[int, list[tuple[int, list[str]]]]:
    out: dict[int, list] = {}
    for record in read_jsonl(run / "trace/rank-0.jsonl"):
        if "samples" in record:
            out.setdefault(record["step"], []).append((record["epoch"], record["samples"]))
    return out


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    """Kill a run with SIGKILL after a checkpoint, resume it: same final step, the same losses at every step
    as a run never interrupted (RESUME_RTOL), the same samples at every step, and no sample twice in an epoch.
    Covers gradient accumulation, lr decay and clipping (scheduler, optimizer state) and epoch boundaries."""
    data = build_tiny_polymnist(tmp_path / "data", modalities=2, train=64, shard_size=16)
    steps = 24
    config = tiny_config(
        tmp_path / "c.yaml",
        data,
        optim={"grad_accum": 2, "lr_decay": 0.9, "lr_decay_every": 3, "grad_clip": 50.0},
        train={"steps": steps, "checkpoint_every": 3, "keep_checkpoints": 2},
    )
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    run_train(["--config", str(config), f"train.out_dir={reference}", "--trace-samples"])

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmebm_dist.train",
            "--config",
            str(config),
            f"train.out_dir={crashed}",
            "--trace-samples",
        ],
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    while latest_checkpoint(crashed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed; raise `steps`"
    killed = read_train_state(latest_checkpoint(crashed))
    assert 0 < killed.step < steps
    assert killed.epoch_batch != 0  # checkpoint_every=3 with 4 steps per epoch: the resume starts mid-epoch

    run_train(["--resume", str(crashed), "--trace-samples"])
    assert read_train_state(latest_checkpoint(crashed)).step == steps
    assert not list((crashed / "checkpoints").glob(".tmp-*"))

    ref, res = read_jsonl(reference / "metrics.jsonl"), read_jsonl(crashed / "metrics.jsonl")
    assert [r["step"] for r in res] == list(range(1, steps + 1))  # records past the checkpoint were dropped
    for a, b in zip(ref, res, strict=True):
        for key in ("loss", "energy_gap", "langevin_grad_norm", "kl_z", "lr/model", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=RESUME_RTOL), (a["step"], key)
        assert (a["epoch"], a["epoch_batch"]) == (b["epoch"], b["epoch_batch"])

    ref_samples, res_samples = _samples_by_step(reference), _samples_by_step(crashed)
    assert res_samples == ref_samples
    seen: dict[int, list[str]] = {}
    for step in sorted(res_samples):
        for epoch, digests in res_samples[step]:
            seen.setdefault(epoch, []).extend(digests)
    assert len(seen) == steps * 2 // 8  # 8 micro-batches per epoch
    for epoch, digests in seen.items():
        assert len(digests) == len(set(digests)) == 64, epoch  # every tuple once per epoch


def test_save_load_roundtrip_restores_parameters_optimizer_and_rng(tmp_path):
    """In process: save, perturb everything, load; parameters, Adam moments and the RNG stream come back."""
    from accelerate.state import AcceleratorState

    from mmebm_dist.config import Config
    from mmebm_dist.train.checkpoint import load_checkpoint, save_checkpoint
    from mmebm_dist.train.distributed import make_accelerator

    AcceleratorState._reset_state(True)
    try:
        accelerator = make_accelerator(Config())
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        model(torch.ones(4, 3)).sum().backward()
        optimizer.step()
        state = TrainState(step=7, epoch=1, epoch_batch=2, data_order={"world_size": 1}, config={"a": 1})
        for step in (3, 5, 7):
            state.step = step
            save_checkpoint(accelerator, model, tmp_path, state, keep=2)
        assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-0000005", "step-0000007"]
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
        expected_draw = torch.rand(5)

        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        optimizer.step()
        torch.rand(100)
        loaded = load_checkpoint(accelerator, latest_checkpoint(tmp_path))
        assert (loaded.step, loaded.epoch, loaded.epoch_batch, loaded.config) == (7, 1, 2, {"a": 1})
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
        torch.testing.assert_close(optimizer.state_dict()["state"][0]["exp_avg"], moments, rtol=0, atol=0)
        torch.testing.assert_close(torch.rand(5), expected_draw, rtol=0, atol=0)
        exported = torch.load(latest_checkpoint(tmp_path) / "model.pt", weights_only=True)
        assert set(exported) == {"weight", "bias"} and exported["weight"].dtype == torch.float32
    finally:
        AcceleratorState._reset_state(True)
