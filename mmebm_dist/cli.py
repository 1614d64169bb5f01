"""The ``mmebm`` command: data, train, sample, export, eval, classifiers, bench.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported only when used, so ``mmebm data`` does not pay for importing deepspeed. An expected error (a bad
config, a missing file, a refused setting) raised by this package prints one line and exits 1; ``--debug`` or
``MMEBM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# name -> (module, one-line help)
COMMANDS = {
    "data": ("mmebm_dist.datasets.cli", "build, verify and inspect webdataset shards"),
    "config": ("mmebm_dist.datasets.starter", "write a starter config from a data set's manifest"),
    "train": ("mmebm_dist.train_cli", "train a model from a config (single process, DDP or DeepSpeed)"),
    "sample": ("mmebm_dist.evaluate.sample_cli", "write joint and cross-generation sample grids of a run"),
    "export": ("mmebm_dist.export_cli", "a run's model as safetensors, config and model card (Hub push)"),
    "eval": ("mmebm_dist.evaluate.cli", "coherence, ELBO and report of a trained run"),
    "results": ("mmebm_dist.evaluate.results", "aggregate evaluated runs into docs/results.{md,json}"),
    "questions": ("mmebm_dist.evaluate.questions", "tabulate the paper's open questions from evaluated runs"),
    "classifiers": ("mmebm_dist.evaluate.classifiers_cli", "train the per-modality digit classifiers"),
    "bench": ("mmebm_dist.bench.cli", "throughput benchmarks: langevin, train, data"),
}


DEBUG_HELP = "show the traceback of an error (also: environment MMEBM_DEBUG=1)"
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError, FloatingPointError)
"""Errors printed as one line when this package raised them (their messages name the cause and the fix)."""
_OUR_CODE = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "kernels")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmebm", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        if name == wanted:  # import only the module of the command being run
            importlib.import_module(module).add_arguments(p)
    return parser


def raised_by_us(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc``'s traceback is in this package (or its kernels)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(path.is_relative_to(root) for root in _OUR_CODE)


def main(argv: list[str] | None = None, *, one_line_errors: bool | None = None) -> int:
    """Run ``mmebm ARGV``. ``one_line_errors`` (default: when ``argv`` is None, i.e. from the command line)
    prints an expected error raised by this package as one line and returns 1; otherwise errors propagate."""
    one_line_errors = argv is None if one_line_errors is None else one_line_errors
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    debug = args.debug or os.environ.get("MMEBM_DEBUG", "") not in ("", "0") or not one_line_errors
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except EXPECTED_ERRORS as exc:
        from mmebm_dist.config import ConfigError

        if debug or not (isinstance(exc, ConfigError) or raised_by_us(exc)):
            raise
        print(f"mmebm {args.command}: {type(exc).__name__}: {exc} (traceback: --debug or MMEBM_DEBUG=1)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
