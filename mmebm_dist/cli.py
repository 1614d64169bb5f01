"""The ``mmebm`` command: data, train, sample, export, eval, classifiers, bench.

Each subcommand lives in its own module of ``mmebm_dist.commands`` exposing ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when used, so ``mmebm data`` does not pay for importing
deepspeed. Every error prints one line and exits 1: an expected one (a bad config, a missing file, a refused
setting, raised by this package or re-raised from a DataLoader worker) as its message, which names the file,
key or value; anything else as "unexpected", the sign of a bug to report. Ctrl-C outside training (which
stops with a checkpoint, exit 75) exits 130. ``--debug`` or ``MMEBM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from mmebm_dist import commands
from mmebm_dist.commands import COMMANDS

DEBUG_HELP = "show the traceback of an error (also: environment MMEBM_DEBUG=1)"
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError, FloatingPointError)
"""Errors printed as one line when this package raised them (their messages name the cause and the fix)."""
_OUR_CODE = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "kernels")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmebm", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        if name == wanted:  # import only the module of the command being run
            commands.add_arguments(name, p)
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


# torch re-raises a DataLoader worker's exception as "Caught ValueError in DataLoader worker process 0.
# Original Traceback (most recent call last): ..." (one object, the worker's traceback in its message).
_WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.\s*Original Traceback")
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C outside the training loop (128 + SIGINT, as a shell reports it)."""


def error_line(command: str, exc: BaseException) -> str:
    """The one line ``mmebm COMMAND`` prints for ``exc`` (bounded: a message quoting a huge value is cut)."""
    from mmebm_dist.config import ConfigError
    from mmebm_dist.userfiles import UserFileError, clip

    hint = "(traceback: --debug or MMEBM_DEBUG=1)"
    worker = _WORKER_ERROR.match(str(exc))
    if worker:  # the worker's own last line: "ValueError: shard ... (the message, which names the file)"
        last = [line for line in str(exc).splitlines() if line.strip()][-1]
        return f"mmebm {command}: DataLoader worker {worker.group(2)}: {clip(last, 1000)} {hint}"
    text = clip(exc, 1000)
    ours = isinstance(exc, EXPECTED_ERRORS) and raised_by_us(exc)
    if ours or isinstance(exc, (ConfigError, UserFileError)):
        return f"mmebm {command}: {type(exc).__name__}: {text} {hint}"
    return (f"mmebm {command}: unexpected {type(exc).__name__}: {text} (please report it with the traceback "
            "of --debug)")


def main(argv: list[str] | None = None, *, one_line_errors: bool | None = None) -> int:
    """Run ``mmebm ARGV``. ``one_line_errors`` (default: when ``argv`` is None, i.e. from the command line)
    prints any error as one line (:func:`error_line`) and returns 1; otherwise errors propagate."""
    one_line_errors = argv is None if one_line_errors is None else one_line_errors
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    debug = args.debug or os.environ.get("MMEBM_DEBUG", "") not in ("", "0") or not one_line_errors
    try:
        return commands.run(args.command, args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"mmebm {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 -- the one top-level handler: every error becomes one line
        if debug:
            raise
        print(error_line(args.command, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
