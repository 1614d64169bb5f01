"""train.schedule: stages of one run (reference prior, energy fit on the frozen model, joint), their lrs,
their logging, exact resume across a stage boundary, and the config errors of a bad schedule."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmebm_dist import schedule
from mmebm_dist.config import ConfigError, StageConfig, load_config
from mmebm_dist.rundir import latest_checkpoint, read_jsonl
from tests.train_helpers import tiny_config

STAGED = [
    "train.steps=9",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=5",
    "train.schedule=[{stage: reference, steps: 3}, {stage: energy, steps: 3, prior_lr: 0.01}, "
    "{stage: joint, steps: 3, lr: 0.001}]",
]




def test_stages_resolve_to_step_ranges_and_group_lrs():
    stages = schedule.resolve(
        [StageConfig(stage="reference", steps=2), StageConfig(stage="energy", steps=3, prior_lr=0.5),
         StageConfig(stage="joint", steps=1)], steps=6, model_lr=0.1, prior_lr=0.2)
    assert [(s.name, s.first, s.last) for s in stages] == [("reference", 1, 2), ("energy", 3, 5),
                                                            ("joint", 6, 6)]
    assert [s.lrs for s in stages] == [{"model": 0.1, "energy": 0.0}, {"model": 0.0, "energy": 0.5},
                                       {"model": 0.1, "energy": 0.2}]
    assert [schedule.stage_at(stages, k).name for k in range(1, 8)] == [
        "reference", "reference", "energy", "energy", "energy", "joint", "joint"]
    # LambdaLR evaluates factor(k) for step k + 1; decay 0.5 every 4 steps multiplies in.
    model, energy = schedule.lr_lambdas(stages, ["model", "energy"], [0.1, 0.2], decay=0.5, every=4)
    assert [model(k) for k in range(6)] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.5]
    assert [energy(k) for k in range(6)] == [0.0, 0.0, 2.5, 2.5, 1.25, 0.5]
    assert [schedule.starting_groups(stages, k) for k in range(1, 7)] == [[], [], ["energy"], [], [],
                                                                         ["model"]]
    plain = schedule.resolve([], steps=5, model_lr=0.1, prior_lr=0.2)
    assert [(s.name, s.first, s.last, s.lrs) for s in plain] == [
        ("joint", 1, 5, {"model": 0.1, "energy": 0.2})]


def test_a_bad_schedule_is_a_config_error_naming_the_key(data2, tmp_path):
    path = tiny_config(tmp_path / "c.yaml", data2)
    with pytest.raises(ConfigError, match=r"train.schedule\[1\].stage.*did you mean 'energy'"):
        load_config(path, ["train.schedule=[{stage: joint, steps: 4}, {stage: energie, steps: 4}]"])
    with pytest.raises(ConfigError, match="'train.schedule' covers 4 steps but train.steps is 8"):
        load_config(path, ["train.schedule=[{stage: reference, steps: 4}]"])
    with pytest.raises(ConfigError, match=r"train.schedule\[0\].steps' must be in \[1, "):
        load_config(path, ["train.schedule=[{stage: reference, steps: 0}, {stage: joint, steps: 8}]"])
    with pytest.raises(ConfigError, match=r"train.schedule\[0\].stage' is 'energy', which needs "
                                          "model.prior.kind=ebm"):
        load_config(path, ["model.prior.kind=laplace", "train.schedule=[{stage: energy, steps: 8}]"])


def test_staged_run_trains_each_part_in_its_stage_and_logs_it(data2, tmp_path, in_process):
    """Reference stage: the energy stays at its initialisation; energy stage: encoders and decoders stay
    put and only the energy moves; joint: both move. metrics.jsonl carries the stage and the group lrs."""
    from mmebm_dist.train.loop import train

    run = tmp_path / "staged"
    train(load_config(tiny_config(tmp_path / "c.yaml", data2), [*STAGED, f"train.out_dir={run}"]))
    weights = {step: torch.load(run / "checkpoints" / f"step-{step:07d}" / "model.pt", weights_only=True)
               for step in (3, 6, 9)}
    from mmebm_dist.models import build_model

    torch.manual_seed(0)
    fresh = build_model(load_config(run / "config.json").model).state_dict()

    def moved(a: dict, b: dict, energy: bool) -> bool:
        keys = [k for k in a if k.startswith("energy.") == energy]
        return any(not torch.equal(a[k], b[k]) for k in keys)

    assert not moved(fresh, weights[3], energy=True)  # the energy waited during the reference stage
    assert moved(weights[3], weights[6], energy=True) and not moved(weights[3], weights[6], energy=False)
    assert moved(weights[6], weights[9], energy=True) and moved(weights[6], weights[9], energy=False)

    # Adam's state restarts when a group starts training: 3 energy steps by step 6, 3 model steps by step 9
    def adam_steps(step: int) -> list[float]:
        state = torch.load(run / "checkpoints" / f"step-{step:07d}" / "optimizer.bin", weights_only=True)
        return [float(state["state"][i]["step"]) for i in sorted(state["state"])]

    groups = torch.load(run / "checkpoints/step-0000006/optimizer.bin", weights_only=True)["param_groups"]
    first_energy = next(g["params"][0] for g in groups if g["name"] == "energy")
    assert set(adam_steps(3)) == {3.0}  # zero gradients still count as steps in the idle energy group
    assert adam_steps(6)[first_energy:] == [3.0] * (len(adam_steps(6)) - first_energy)
    assert set(adam_steps(9)) == {3.0, 6.0}

    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["stage"] for r in records] == ["reference"] * 3 + ["energy"] * 3 + ["joint"] * 3
    assert [r["stage_index"] for r in records] == [0] * 3 + [1] * 3 + [2] * 3
    assert "energy_gap" not in records[0] and "elbo" not in records[3] and "energy_gap" in records[6]
    # lrs logged after each step are those of the next step's stage
    assert [r["lr/energy"] for r in records][:6] == [0.0, 0.0, 0.01, 0.01, 0.01, 0.001]
    assert [r["lr/model"] for r in records][:6] == [0.003, 0.003, 0.0, 0.0, 0.0, 0.001]


@pytest.mark.parametrize("stop", [3, 4])
def test_resume_across_a_stage_boundary_is_exact(data2, tmp_path, in_process, stop):
    """Stopped at the end of the reference stage (or one step into the energy stage) and resumed: the same
    losses, stages and final weights as the uninterrupted run."""
    from mmebm_dist.train.loop import train

    path = tiny_config(tmp_path / "c.yaml", data2)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(load_config(path, [*STAGED, f"train.out_dir={whole}"]))
    train(load_config(path, [*STAGED, f"train.out_dir={parts}", f"train.steps={stop}",
                             "train.checkpoint_every=1"]))
    resumed = load_config(parts / "config.json", [*STAGED[:1]])
    train(resumed, resume=True)
    keys = ("step", "stage", "loss", "energy_gap", "elbo")
    strip = lambda rs: [{k: r.get(k) for k in keys} for r in rs if "loss" in r]  # noqa: E731
    assert strip(read_jsonl(parts / "metrics.jsonl")) == strip(read_jsonl(whole / "metrics.jsonl"))
    a = torch.load(latest_checkpoint(whole) / "model.pt", weights_only=True)
    b = torch.load(latest_checkpoint(parts) / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_staged_run_samples_as_its_checkpoint_stage(data2, tmp_path, in_process):
    """A run stopped in the reference stage samples from p0 (its energy is untrained); after the energy
    stage the sampler runs Langevin on the energy."""
    from mmebm_dist.evaluate.generate import load_run
    from mmebm_dist.train.loop import train

    run = tmp_path / "r"
    path = tiny_config(tmp_path / "c.yaml", data2)
    train(load_config(path, [*STAGED, f"train.out_dir={run}", "train.steps=3"]))
    assert load_run(run).model.stage == "reference"
    train(load_config(run / "config.json", ["train.steps=9"]), resume=True)
    assert load_run(run).model.stage == "joint"


def test_the_reference_stage_trains_the_laplace_runs_model_step_for_step(data2, tmp_path, in_process):
    """An EBM run's reference stage is its Laplace control, bit for bit (same losses, same encoder/decoder
    weights), so a run that then fits only the energy (configs/polymnist_ebm_fitted.yaml) keeps the control's
    model and its cross coherence."""
    from mmebm_dist.train.loop import train

    path = tiny_config(tmp_path / "c.yaml", data2)
    ebm, lap = tmp_path / "ebm", tmp_path / "lap"
    train(load_config(path, ["train.steps=6", "train.schedule=[{stage: reference, steps: 3}, "
                             "{stage: energy, steps: 3}]", f"train.out_dir={ebm}"]))
    train(load_config(path, ["train.steps=3", "model.prior.kind=laplace", f"train.out_dir={lap}"]))
    losses = lambda run: [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses(ebm)[:3] == losses(lap) and len(losses(lap)) == 3
    a = torch.load(latest_checkpoint(ebm) / "model.pt", weights_only=True)
    b = torch.load(latest_checkpoint(lap) / "model.pt", weights_only=True)
    shared = [k for k in b if not k.startswith("energy.")]
    assert shared and set(shared) <= set(a) and all(torch.equal(a[k], b[k]) for k in shared)


def test_the_schedule_says_what_each_stage_trains_and_adds():
    """Groups per stage, the energy_updates - 1 energy-only updates of a joint stage (none elsewhere), and a
    post-hoc fit as one energy stage that keeps them."""
    staged = schedule.resolve(
        [StageConfig(stage="reference", steps=2), StageConfig(stage="energy", steps=3),
         StageConfig(stage="joint", steps=1)], steps=6, model_lr=0.1, prior_lr=0.2, energy_updates=3)
    assert [s.groups for s in staged] == [("model",), ("energy",), ("model", "energy")]
    extra = schedule.Update(objective="energy", groups=("energy",), what="an extra energy update",
                            setting="model.prior.energy_updates=3")
    assert [s.extra_updates for s in staged] == [(), (), (extra, extra)]
    (posthoc,) = schedule.resolve([], steps=4, model_lr=0.1, prior_lr=0.2, energy_updates=2, posthoc=True)
    once = dataclasses.replace(extra, setting="model.prior.energy_updates=2")
    assert (posthoc.name, posthoc.lrs, posthoc.extra_updates) == ("energy", {"model": 0.0, "energy": 0.2},
                                                                   (once,))
    (plain,) = schedule.resolve([], steps=4, model_lr=0.1, prior_lr=0.2)
    assert plain.extra_updates == ()


def test_the_model_hook_switches_the_stage_and_refuses_a_due_fit_without_a_fitter(data2, tmp_path):
    from mmebm_dist.models import build_model

    cfg = load_config(tiny_config(tmp_path / "c.yaml", data2),
                      [*STAGED, "model.prior.reference=gmm", "model.prior.reference_components=2",
                       "model.prior.reference_fit_tuples=8", "model.prior.coupling_ramp_steps=4"])
    model, stages = build_model(cfg.model), schedule.of_config(cfg)
    model.on_step(2, schedule.stage_at(stages, 2))
    assert model.stage == "reference" and float(model.coupling) == 0.5
    with model.objective("joint"):
        assert model.stage == "joint"
    assert model.stage == "reference"
    with pytest.raises(RuntimeError, match="step 4 fits the learned reference.*no reference_fitter"):
        model.on_step(4, schedule.stage_at(stages, 4))
    fitted = []
    model.reference_fitter = fitted.append
    model.on_step(4, schedule.stage_at(stages, 4))
    assert model.stage == "energy" and fitted == [model]
