"""Training stages (``train.schedule``): which part of the model trains at each step, and at which lr.

A schedule is a list of stages run in order, each ``{stage: reference|energy|joint, steps: N}`` with optional
``lr`` (encoders/decoders) and ``prior_lr`` (the energy). The stage of a step is a pure function of the step,
so a run resumed at any step (a stage boundary included) continues exactly where it would have been; the
per-group lr factors are LambdaLR lambdas, so the scheduler's saved state is all a resume needs.
An empty schedule is the plain run: one joint stage of ``train.steps`` at ``optim.lr`` / ``prior.lr``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

STAGE_GROUPS = {"reference": ("model",), "energy": ("energy",), "joint": ("model", "energy")}
"""The optimizer groups each stage trains; the other groups run at lr 0."""


@dataclass(frozen=True)
class Stage:
    """One stage resolved: its name, index, first and last step (1-based, inclusive) and per-group lrs."""

    name: str
    index: int
    first: int
    last: int
    lrs: dict[str, float]


def resolve(schedule: Sequence, *, steps: int, model_lr: float, prior_lr: float) -> list[Stage]:
    """Stages with absolute step ranges; an empty schedule is one joint stage over ``steps``."""
    if not schedule:
        return [Stage("joint", 0, 1, max(steps, 1), {"model": model_lr, "energy": prior_lr})]
    stages, first = [], 1
    for i, s in enumerate(schedule):
        lrs = {"model": s.lr if s.lr is not None else model_lr,
               "energy": s.prior_lr if s.prior_lr is not None else prior_lr}
        lrs = {g: (lr if g in STAGE_GROUPS[s.stage] else 0.0) for g, lr in lrs.items()}
        stages.append(Stage(s.stage, i, first, first + s.steps - 1, lrs))
        first += s.steps
    return stages


def of_config(cfg) -> list[Stage]:
    """The stages of a :class:`mmebm_dist.config.Config` (``train.schedule``, ``optim.lr``, ``prior.lr``)."""
    return resolve(cfg.train.schedule, steps=cfg.train.steps, model_lr=cfg.optim.lr,
                   prior_lr=cfg.model.prior.lr)


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
