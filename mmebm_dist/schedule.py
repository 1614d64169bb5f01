"""Training stages (``train.schedule``): which part of the model trains at each step, and at which lr.

A schedule is a list of stages run in order, each ``{stage: reference|energy|joint, steps: N}`` with optional
``lr`` (encoders/decoders) and ``prior_lr`` (the energy). The stage of a step is a pure function of the step,
so a run resumed at any step (a stage boundary included) continues exactly where it would have been; the
per-group lr factors are LambdaLR lambdas, so the scheduler's saved state is all a resume needs.
An empty schedule is the plain run: one joint stage of ``train.steps`` at ``optim.lr`` / ``prior.lr`` (one
energy stage for a post-hoc fit, ``model.prior.fit=posthoc``).

This module is the one place that says what a stage changes: the optimizer groups it trains
(:data:`STAGE_GROUPS`, whose lr is 0 in the other stages), the objective the model computes (the stage's name,
set through the model's ``on_step`` hook), and the extra updates after a step's own (:class:`Update`). The
training loop applies a :class:`Stage` without looking at its name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

GROUPS = ("model", "energy")
"""The model's optimizer groups: encoders/decoders/private priors, and the energy (``param_groups``)."""
STAGE_GROUPS = {"reference": ("model",), "energy": ("energy",), "joint": ("model", "energy")}
"""The optimizer groups each stage trains; the other groups run at lr 0 and get zero gradients."""


@dataclass(frozen=True)
class Update:
    """An optimizer update after a step's own, on the step's last micro-batch: the model computes the loss
    of stage ``objective``, and only ``groups`` move (the other groups' gradients are dropped before the
    optimizer step, so Adam leaves their parameters and moments untouched)."""

    objective: str
    groups: tuple[str, ...]
    what: str
    """What the update is, for messages (``an extra energy update``)."""
    setting: str
    """The config setting that asks for it, for messages (``model.prior.energy_updates=3``)."""


@dataclass(frozen=True)
class Stage:
    """One stage resolved: its name (the objective the model computes), index, first and last step (1-based,
    inclusive), per-group lrs and the updates each of its steps runs after its own."""

    name: str
    index: int
    first: int
    last: int
    lrs: dict[str, float]
    extra_updates: tuple[Update, ...] = ()

    @property
    def groups(self) -> tuple[str, ...]:
        """The optimizer groups this stage trains."""
        return STAGE_GROUPS[self.name]


def _energy_updates(count: int) -> tuple[Update, ...]:
    """``count - 1`` energy-only updates (``model.prior.energy_updates``)."""
    update = Update(objective="energy", groups=STAGE_GROUPS["energy"], what="an extra energy update",
                    setting=f"model.prior.energy_updates={count}")
    return (update,) * (count - 1)


def resolve(schedule: Sequence, *, steps: int, model_lr: float, prior_lr: float, energy_updates: int = 1,
            posthoc: bool = False) -> list[Stage]:
    """Stages with absolute step ranges; an empty schedule is one joint stage over ``steps`` (one energy
    stage when ``posthoc``). ``energy_updates``: energy optimizer steps per model step, so a joint stage (and
    the post-hoc fit's stage) runs ``energy_updates - 1`` energy-only updates after each of its steps."""
    extra = _energy_updates(energy_updates)
    if not schedule:
        name = "energy" if posthoc else "joint"
        lrs = {"model": model_lr, "energy": prior_lr}
        lrs = {g: (lr if g in STAGE_GROUPS[name] else 0.0) for g, lr in lrs.items()}
        return [Stage(name, 0, 1, max(steps, 1), lrs, extra)]
    stages, first = [], 1
    for i, s in enumerate(schedule):
        lrs = {"model": s.lr if s.lr is not None else model_lr,
               "energy": s.prior_lr if s.prior_lr is not None else prior_lr}
        lrs = {g: (lr if g in STAGE_GROUPS[s.stage] else 0.0) for g, lr in lrs.items()}
        stages.append(Stage(s.stage, i, first, first + s.steps - 1, lrs, extra if s.stage == "joint" else ()))
        first += s.steps
    return stages


def of_config(cfg) -> list[Stage]:
    """The stages of a :class:`mmebm_dist.config.Config` (``train.schedule``, ``optim.lr``, ``prior.lr``,
    ``prior.energy_updates`` of an EBM prior, ``prior.fit``)."""
    prior = cfg.model.prior
    return resolve(cfg.train.schedule, steps=cfg.train.steps, model_lr=cfg.optim.lr, prior_lr=prior.lr,
                   energy_updates=prior.energy_updates if prior.kind == "ebm" else 1,
                   posthoc=prior.fit == "posthoc")


def stage_at(stages: Sequence[Stage], step: int) -> Stage:
    """The stage that step ``step`` (1-based) belongs to; steps past the last stage belong to the last."""
    for stage in stages:
        if step <= stage.last:
            return stage
    return stages[-1]


def starting_groups(stages: Sequence[Stage], step: int) -> list[str]:
    """Optimizer groups that start training at ``step``: the first step of a stage that trains a group the
    previous stage did not. Their optimizer state is reset there, as a separate run would start it: moment
    estimates decayed through a stage of zero gradients would make the first steps many times too large."""
    stage = stage_at(stages, step)
    if stage.index == 0 or step != stage.first:
        return []
    before = stages[stage.index - 1]
    return [g for g, lr in stage.lrs.items() if lr > 0 and before.lrs.get(g, 0.0) == 0]


def lr_lambdas(stages: Sequence[Stage], group_names: Sequence[str], base_lrs: Sequence[float], *,
               decay: float, every: int) -> list[Callable[[int], float]]:
    """One LambdaLR factor per optimizer group: the stage's lr for the group over its base lr, times the
    exponential decay. LambdaLR evaluates ``lambda(k)`` for step k + 1 (k scheduler steps taken so far)."""

    def factor(name: str, base: float) -> Callable[[int], float]:
        def f(k: int) -> float:
            lr = stage_at(stages, k + 1).lrs.get(name, base)
            return (lr / base if base > 0 else 0.0) * decay ** (k // every)
        return f

    return [factor(n, b) for n, b in zip(group_names, base_lrs, strict=True)]
