"""Config changes on ``--resume``: the ones a checkpoint can take, applied after its state is loaded; the rest
refused naming the key.

The optimizer's state brings back the lrs and betas it was saved with, so without this an override such as
``model.prior.lr=1e-4`` would be recorded in config.json and silently ignored.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from mmebm_dist.config import Config, ConfigError, config_to_dict, flatten_dotted

log = logging.getLogger(__name__)

OPTIMIZER_KEYS = frozenset(
    {"optim.lr", "optim.betas", "optim.lr_decay", "optim.lr_decay_every", "model.prior.lr",
     "model.prior.betas"}
)
"""Changes that need the resumed optimizer's param groups and scheduler rewritten."""

RESUMABLE_PREFIXES = (
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
    "train.image_every", "train.trackers", "train.threads", "train.compile", "train.dist_timeout_s",
    "train.out_dir", "optim.grad_clip", "optim.grad_accum", "model.beta", "model.prior.energy_l2",
    "model.prior.langevin.", "model.prior.max_energy_gap", "model.prior.max_posterior_abs", "data.", "eval.",
)
"""Changes a resumed run simply reads from the config (loss weights, guards, logging, Langevin settings,
gradient accumulation: an elastic resume may keep the global batch with it; ``data.*`` mid-epoch is checked
separately, by :func:`mmebm_dist.train.elastic.continue_epoch`)."""


def resume_changes(saved: dict, cfg: Config, source: object) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved, new)`` for every field of ``cfg`` that differs from the checkpoint's config ``saved``;
    raises ConfigError naming the first key a resume cannot change (``source`` names the checkpoint)."""
    old = flatten_dotted(saved)
    new = flatten_dotted(json.loads(json.dumps(config_to_dict(cfg))))  # tuples -> lists, as in the saved JSON
    # A key the saved config lacks is a field added since the run started: its default stands, not a change.
    changes = {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}
    for key, (before, after) in changes.items():
        if key in OPTIMIZER_KEYS or key.startswith(RESUMABLE_PREFIXES):
            continue
        raise ConfigError(
            f"{key} cannot change on resume ({source} has {before!r}, asked {after!r}): it fixes the model, "
            "optimizer or random streams; start a new run (train.init_from=<this run> keeps the weights)"
        )
    return changes


def apply_optimizer_changes(
    optimizer: torch.optim.Optimizer, scheduler: Any, fresh: list[dict], changes: dict[str, tuple]
) -> None:
    """After loading a checkpoint: give every param group the betas and base lr of ``fresh`` (the groups as
    built from the new config, captured before the load) and recompute each lr from the new schedule."""
    if not OPTIMIZER_KEYS & changes.keys():
        return
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the LambdaLR
    groups = optimizer.param_groups
    if len(groups) != len(fresh):
        raise ConfigError(f"the checkpoint has {len(groups)} optimizer groups, the config {len(fresh)}")
    inner.base_lrs = [g["initial_lr"] for g in fresh]
    for group, new, base, factor in zip(groups, fresh, inner.base_lrs, inner.lr_lambdas, strict=True):
        group["betas"], group["initial_lr"] = new["betas"], base
        group["lr"] = base * factor(inner.last_epoch)
    inner._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports (and metrics log)
    log.info("resume applies %s", ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changes.items()
                                             if k in OPTIMIZER_KEYS))


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Base lr and betas of each param group (captured before a checkpoint's state overwrites them)."""
    return [{"initial_lr": g.get("initial_lr", g["lr"]), "betas": tuple(g["betas"])}
            for g in optimizer.param_groups]
