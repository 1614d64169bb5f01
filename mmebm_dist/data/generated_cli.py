"""``mmebm data mnist-svhn`` and ``mmebm data birds``: the GENERATED stand-ins for MNIST-SVHN and CUB.

:func:`add_subcommands` adds both to the ``mmebm data`` sub-parsers; each parser's ``generated_run`` default
runs its builder. The builders also expose ``add_build_arguments`` / ``build_from_args``, the interface of
``mmebm_dist.data.cli.BUILDERS``, so they can be listed there instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Subcommand -> (builder module, one-line help).
GENERATED = {
    "mnist-svhn": (
        "mmebm_dist.data.mnist_svhn",
        "MNIST paired per class with GENERATED street-number digits (an MNIST-SVHN stand-in)",
    ),
    "birds": (
        "mmebm_dist.data.birds",
        "GENERATED birds with templated captions (a CUB image+caption stand-in)",
    ),
}


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mnist-svhn`` and ``birds`` to ``subparsers``; ``args.generated_run(args)`` then builds."""
    import importlib

    for name, (module, help_text) in GENERATED.items():
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_build_arguments(parser)
        parser.set_defaults(generated_run=run_mnist_svhn if name == "mnist-svhn" else run_birds)


def _run(module_name: str, args: argparse.Namespace) -> int:
    import importlib

    from mmebm_dist.data.shards import ShardError
    from mmebm_dist.data.sources import SourceError

    start = time.perf_counter()
    try:
        manifest = importlib.import_module(module_name).build_from_args(args)
    except (ShardError, SourceError, FileExistsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"mmebm data {args.data_command}: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    size = sum((Path(args.out) / s["name"]).stat().st_size for s in manifest["shards"])
    counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
    print(
        f"wrote {args.out}: {counts} samples, {len(manifest['shards'])} shards, {size / 2**20:.1f} MiB "
        f"in {seconds:.1f} s" + (f"; grid {args.grid}" if args.grid else "")
    )
    return 0


def run_mnist_svhn(args: argparse.Namespace) -> int:
    """Build the MNIST + street-number data set from parsed flags; exit status."""
    return _run(GENERATED["mnist-svhn"][0], args)


def run_birds(args: argparse.Namespace) -> int:
    """Build the birds + captions data set from parsed flags; exit status."""
    return _run(GENERATED["birds"][0], args)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m mmebm_dist.data.generated_cli mnist-svhn --out DIR``) until wired in."""
    parser = argparse.ArgumentParser(prog="mmebm data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    add_subcommands(sub)
    args = parser.parse_args(argv)
    return args.generated_run(args)


if __name__ == "__main__":
    sys.exit(main())
