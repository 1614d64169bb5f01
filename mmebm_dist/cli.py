"""The ``mmebm`` command: data, train, sample, eval, classifiers, bench.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported only when used, so ``mmebm data`` does not pay for importing deepspeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "data": ("mmebm_dist.datasets.cli", "build, verify and inspect webdataset shards"),
    "train": ("mmebm_dist.train.cli", "train a model from a config (single process, DDP or DeepSpeed)"),
    "sample": ("mmebm_dist.evaluate.sample_cli", "write joint and cross-generation sample grids of a run"),
    "eval": ("mmebm_dist.evaluate.cli", "coherence, ELBO and report of a trained run"),
    "results": ("mmebm_dist.evaluate.results", "aggregate evaluated runs into docs/results.{md,json}"),
    "classifiers": ("mmebm_dist.evaluate.classifiers_cli", "train the per-modality digit classifiers"),
    "bench": ("mmebm_dist.bench.cli", "throughput benchmarks: langevin, train, data"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmebm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # import only the module of the command being run
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
