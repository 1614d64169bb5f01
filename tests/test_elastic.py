"""Elastic resume, in process: the engine-independent optimizer state round-trips exactly, RNG streams are
re-derived per rank, and a checkpoint of another layout is named as such with the command that resumes it
(never reported as corrupt). The multi-process resumes (DDP 2 -> 1, ZeRO-2 2 -> 1, 1 -> 2) are in
tests/test_elastic_launch.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import build_tiny_polymnist, tiny_config

from mmebm_dist.config import load_config
from mmebm_dist.rundir import STATE_FILE, TrainState
from mmebm_dist.train import elastic
from mmebm_dist.train.checkpoint import CheckpointError


@pytest.fixture
def accelerator():
    from accelerate.state import AcceleratorState

    from mmebm_dist.config import Config
    from mmebm_dist.train.distributed import make_accelerator

    AcceleratorState._reset_state(True)
    yield make_accelerator(Config())
    AcceleratorState._reset_state(True)


def _prepared(accelerator, cfg):
    from mmebm_dist.models import build_model
    from mmebm_dist.train.loop import build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    return model, *accelerator.prepare(optimizer, scheduler)


def test_full_optimizer_state_round_trips(accelerator, tmp_path):
    """Adam's moments (amsgrad's max too), step counts, lrs and the scheduler position written by one job come
    back bitwise in a fresh one, keyed by parameter name."""
    data = build_tiny_polymnist(tmp_path / "data", modalities=2, train=16, shard_size=16)
    cfg = load_config(tiny_config(tmp_path / "c.yaml", data, optim={"lr_decay": 0.5, "lr_decay_every": 1}))
    model, optimizer, scheduler = _prepared(accelerator, cfg)
    for _ in range(3):
        sum(p.square().sum() for p in model.parameters()).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    elastic.write_full_optimizer_state(accelerator, model, optimizer, scheduler, cfg, tmp_path)
    assert json.loads((tmp_path / elastic.ENGINE_FILE).read_text()) == {
        "engine": "single", "zero_stage": 0, "world_size": 1}

    fresh, fresh_opt, fresh_sched = _prepared(accelerator, cfg)
    fresh.load_state_dict(model.state_dict())
    elastic.load_full_optimizer_state(fresh_opt, fresh_sched, fresh, cfg, tmp_path)
    names = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        want, got = optimizer.state[names[name]], fresh_opt.state[p]
        assert set(got) == set(want) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * 0.5**3)
    assert fresh_sched.scheduler.last_epoch == 3


def test_reseed_differs_by_rank_and_step_and_repeats():
    draws = {}
    for key in [(0, 10, 0, 2), (0, 10, 1, 2), (0, 11, 0, 2), (0, 10, 0, 2)]:
        elastic.reseed(*key)
        draws.setdefault(key, []).append(torch.rand(3))
    first, again = draws[(0, 10, 0, 2)]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, draws[(0, 10, 1, 2)][0])
    assert not torch.equal(first, draws[(0, 11, 0, 2)][0])


def _checkpoint(run: Path, *, world: int, deepspeed: bool, engine_json: bool, full_state: bool) -> Path:
    """A checkpoint directory with the files that decide its layout (a valid train_state.json)."""
    ckpt = run / "checkpoints/step-0000006"
    ckpt.mkdir(parents=True)
    state = TrainState(step=6, epoch=1, epoch_batch=2, data_order={"world_size": world}, config={})
    (ckpt / STATE_FILE).write_text(json.dumps(state.__dict__))
    if deepspeed:
        (ckpt / "pytorch_model").mkdir()
    if engine_json:
        layout = {"engine": "deepspeed" if deepspeed else "ddp", "zero_stage": 2 if deepspeed else 0,
                  "world_size": world}
        (ckpt / elastic.ENGINE_FILE).write_text(json.dumps(layout))
    if full_state:
        torch.save({"groups": [], "state": {}, "scheduler": {}}, ckpt / elastic.OPTIMIZER_FILE)
    return ckpt


def test_older_deepspeed_checkpoint_is_named_with_its_resume_command(accelerator, tmp_path):
    """The issue's case: a ZeRO checkpoint of 2 processes resumed by one process is not 'corrupt'."""
    _checkpoint(tmp_path, world=2, deepspeed=True, engine_json=False, full_state=False)
    with pytest.raises(CheckpointError) as err:
        elastic.elastic_checkpoint(accelerator, tmp_path, None)
    text = str(err.value)
    assert "written by DeepSpeed ZeRO-? on 2 processes and this job is one process" in text
    assert "optimizer_full.pt" in text and "does not load" not in text
    assert f"accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 -m mmebm_dist.train " \
           f"--resume {tmp_path}" in text


def test_checkpoint_of_another_layout_with_full_state_is_resumed_elastically(accelerator, tmp_path):
    ckpt = _checkpoint(tmp_path, world=2, deepspeed=False, engine_json=True, full_state=True)
    assert elastic.elastic_checkpoint(accelerator, tmp_path, None) == ckpt


def test_checkpoint_of_this_layout_takes_the_ordinary_path(accelerator, tmp_path):
    _checkpoint(tmp_path, world=1, deepspeed=False, engine_json=False, full_state=False)
    assert elastic.elastic_checkpoint(accelerator, tmp_path, None) is None


def test_resume_commands():
    run = Path("runs/x")
    assert elastic.resume_command({"engine": "single", "zero_stage": 0, "world_size": 1}, run) == \
        "mmebm train --resume runs/x"
    assert elastic.resume_command({"engine": "ddp", "zero_stage": 0, "world_size": 4}, run) == \
        "accelerate launch --multi_gpu --num_processes 4 -m mmebm_dist.train --resume runs/x"
