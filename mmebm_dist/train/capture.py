"""``train.compile``: the training step under ``torch.compile``, CUDA graphs where the shapes allow.

The step is the model's forward (encoders, Langevin chain, decoders, objective; its backward is compiled with
it by AOTAutograd) and the optimizer's update, each compiled with the chosen mode; ``loss.backward()``
between them stays a plain call (a graph break). ``reduce-overhead`` records each compiled graph as a CUDA
graph, replayed on every later step with the same shapes (static shapes: a step's never change); graph
breaks (the Triton Langevin launch, the sampler's checks) run eagerly between the replays, which is the
fallback where capture is not possible. ``off`` is the eager step.
"""

from __future__ import annotations

import logging

import torch

from mmebm_dist.config import Config

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "reduce-overhead")
_ALIASES = {"false": "off", "no": "off", "0": "off", "true": "default", "yes": "default", "1": "default"}


def compile_mode(value: str, device: torch.device) -> str:
    """``train.compile`` as a torch.compile mode or ``off``; ``true``/``false`` are ``default``/``off``.

    ``reduce-overhead`` captures CUDA graphs, which exist only on CUDA: on another device it raises rather
    than silently running something else.
    """
    mode = _ALIASES.get(str(value).lower(), str(value).lower())
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
    changes a Python float in the optimizer, which recompiles the step once per change (torch's recompile
    limit then falls back to eager: logged by torch).
    """
    mode = compile_mode(cfg.train.compile, device)
    if mode == "off":
        return mode
    model.forward = torch.compile(model.forward, mode=mode, dynamic=False)
    if optimizer is not None:
        optimizer.step = torch.compile(optimizer.step, mode=mode, dynamic=False)
    log.info("train.compile=%s: forward and optimizer step compiled (mode %s)", cfg.train.compile, mode)
    return mode
