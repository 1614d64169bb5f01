"""Every ``mmebm`` subcommand: its arguments (argparse) and its ``run(args) -> int``, one module per group.

A command parses, calls the library with typed options, prints and returns the exit status; the library
never sees argparse and never exits. A refused option (:class:`mmebm_dist.config.OptionError`, raised by the
library) ends the command as argparse's own refusals do: its message alone, exit status 1 (:func:`run`).
"""

from __future__ import annotations

import argparse
import importlib

from mmebm_dist.config import OptionError

COMMANDS = {
    "data": ("mmebm_dist.commands.data", "build, verify and inspect webdataset shards"),
    "config": ("mmebm_dist.commands.config", "write a starter config from a data set's manifest"),
    "train": ("mmebm_dist.commands.train", "train a model from a config (single process, DDP or DeepSpeed)"),
    "sample": ("mmebm_dist.commands.sample", "write joint and cross-generation sample grids of a run"),
    "export": ("mmebm_dist.commands.export",
               "a run's model as safetensors, config and model card (Hub push)"),
    "eval": ("mmebm_dist.commands.eval", "coherence, ELBO and report of a trained run"),
    "results": ("mmebm_dist.commands.results", "aggregate evaluated runs into docs/results.{md,json}"),
    "questions": ("mmebm_dist.commands.questions", "tabulate the paper's open questions from evaluated runs"),
    "classifiers": ("mmebm_dist.commands.classifiers", "train the per-modality digit classifiers"),
    "bench": ("mmebm_dist.commands.bench", "throughput benchmarks: langevin, train, data"),
}
"""name -> (module exposing ``add_arguments(parser)`` and ``run(args)``, one-line help)."""


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Define the arguments of command ``name`` (importing its module only now)."""
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)


def run(name: str, args: argparse.Namespace) -> int:
    """Run command ``name``; a refused option exits with its message, as argparse's refusals do."""
    try:
        return int(importlib.import_module(COMMANDS[name][0]).run(args) or 0)
    except OptionError as exc:
        raise SystemExit(str(exc)) from exc
