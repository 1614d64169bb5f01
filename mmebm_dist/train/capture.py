"""``train.compile``: the training step under ``torch.compile``, CUDA graphs where the shapes allow.

The step is the model's forward (encoders, Langevin chain, decoders, objective, energy loss; its backward is
compiled with it by AOTAutograd) and the optimizer's update, each compiled with the chosen mode as one graph:
the forward traces without a break for the EBM and the Laplace models in every stage (the Langevin chain runs
as the traced torch chain, ``langevin_traced``; the energy-gradient diagnostic is analytic).
``loss.backward()``, clipping and the runaway check stay plain calls between the two compiled units.
``reduce-overhead`` records each compiled graph as a CUDA graph, replayed on every later step with the same
shapes (static shapes: a step's never change). ``off`` is the eager step.

Recompilation: the forward guards on the model's stage (one graph per stage it trains); the lr reaches the
compiled optimizer step as a 0-d tensor per param group, so lr decay and stage lrs never recompile it (a
stage that resets Adam's state compiles its first step again, once). The coupling ramp is a buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from mmebm_dist.config import Config

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "reduce-overhead")
_ALIASES = {"false": "off", "no": "off", "0": "off", "true": "default", "yes": "default", "1": "default"}


def mode_name(value: str) -> str:
    """``train.compile`` with its aliases resolved (a YAML ``off`` loads as false): off, default, ..."""
    return _ALIASES.get(str(value).lower(), str(value).lower())


def compile_mode(value: str, device: torch.device) -> str:
    """``train.compile`` as a torch.compile mode or ``off``; ``true``/``false`` are ``default``/``off``.

    ``reduce-overhead`` captures CUDA graphs, which exist only on CUDA: on another device it raises rather
    than silently running something else.
    """
    mode = mode_name(value)
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile must be one of {', '.join(COMPILE_MODES)} (or true/false), "
                         f"got '{value}'")
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError(f"train.compile=reduce-overhead captures CUDA graphs, but this process trains on "
                         f"{device.type}; use train.compile=default (inductor, no graphs) or off")
    return mode


def capture_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, cfg: Config,
                 device: torch.device) -> str:
    """Compile ``model.forward`` and ``optimizer.step`` in place per ``train.compile``; returns the mode.

    Call before ``accelerator.prepare`` (the wrappers call the patched methods). Static shapes: with dynamic
    ones the graph of a helper called at several sizes (the per-modality decoders) gets a symbolic batch that
    the reparameterisation draws (``torch.rand(shape, generator=...)``) refuse. The learning-rate schedule
    changes each group's Python float lr; the compiled step reads it from a 0-d tensor
    (:func:`tensor_lr_step`), so the floats stay what the scheduler, the checkpoints and the metrics see.
    """
    mode = compile_mode(cfg.train.compile, device)
    if mode == "off":
        return mode
    model.forward = torch.compile(model.forward, mode=mode, dynamic=False)
    if optimizer is not None:
        optimizer.step = tensor_lr_step(optimizer, torch.compile(optimizer.step, mode=mode, dynamic=False),
                                        device)
    log.info("train.compile=%s: forward and optimizer step compiled (mode %s)", cfg.train.compile, mode)
    return mode


def tensor_lr_step(optimizer: torch.optim.Optimizer, step: Callable[[], Any],
                   device: torch.device) -> Callable[[], Any]:
    """``step`` (the compiled ``optimizer.step``) called with each param group's lr swapped for one 0-d tensor
    holding it, and the float put back after.

    A float lr is a constant of the compiled graph: every change (lr decay, a stage's lrs) would recompile it
    (torch then gives up after its recompile limit and runs eagerly). The same tensor objects are passed at
    every call, their values filled from the floats the scheduler set, so one graph serves every lr.

    A group at lr 0 (one the stage does not train) sits the call out with its gradients set to None. Dynamo
    traces Adam with ``capturable=True``, whose update divides sqrt(v) by lr-scaled terms: at lr 0 that is
    0 / -0 = NaN wherever v = 0 (a parameter that never had a gradient), written into the parameter (torch
    2.13; the eager, non-capturable update is exact). Skipping the group instead leaves its parameters as lr 0
    would and freezes its Adam moments, which the schedule resets anyway when the group starts training
    (``schedule.starting_groups``), so the run is the eager one.
    """
    lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in optimizer.param_groups]

    def step_with_tensor_lr(*args: Any, **kwargs: Any) -> Any:
        groups = optimizer.param_groups
        floats = [group["lr"] for group in groups]
        for group, lr, value in zip(groups, lrs, floats, strict=True):
            lr.fill_(value)
            group["lr"] = lr
            if value == 0:
                for p in group["params"]:
                    p.grad = None
        try:
            return step(*args, **kwargs)
        finally:
            for group, value in zip(groups, floats, strict=True):
                group["lr"] = value

    return step_with_tensor_lr
