"""``mmebm data``: build a data set (``polymnist``), ``verify`` its shards against the manifest, ``info``,
``convert`` it to another image encoding."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Builder name -> (module exposing add_build_arguments(parser) and build_from_args(args) -> manifest, help).
BUILDERS = {
    "polymnist": ("mmebm_dist.datasets.polymnist", "PolyMNIST-style M-view data from mnist, idx or fashion"),
    "mnist-svhn": ("mmebm_dist.datasets.mnist_svhn",
                   "MNIST paired per class with GENERATED street-number digits (an MNIST-SVHN stand-in)"),
    "birds": ("mmebm_dist.datasets.birds", "GENERATED birds with templated captions (a CUB stand-in)"),
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_generated_build_arguments(
    parser: argparse.ArgumentParser,
    defaults: Any,
    *,
    seed_help: str,
    num_train_help: str,
    num_test_help: str,
    count_type: Callable[[str], int] = positive_int,
    shard_help: str = "samples per shard",
    grid_help: str = "also write a grid of test samples to this PNG",
) -> None:
    """The flags every generated-data builder shares: --out, --seed, --num-train, --num-test, --shard-size,
    --workers, --overwrite, --grid, --encoding; defaults come from the builder's spec dataclass
    (``defaults``)."""
    from mmebm_dist.data.shards import IMAGE_ENCODINGS

    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=seed_help)
    parser.add_argument("--num-train", type=count_type, default=defaults.num_train, help=num_train_help)
    parser.add_argument("--num-test", type=count_type, default=defaults.num_test, help=num_test_help)
    parser.add_argument("--shard-size", type=positive_int, default=defaults.shard_size, help=shard_help)
    parser.add_argument(
        "--workers", type=int, default=defaults.workers, help="processes (default 0: all cores)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    parser.add_argument("--grid", default=None, metavar="PNG", help=grid_help)
    parser.add_argument(
        "--encoding", choices=IMAGE_ENCODINGS, default=defaults.encoding,
        help="images as png, or raw uint8 [C, H, W] bytes (faster to load) (default: %(default)s)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    wanted = sys.argv[2] if len(sys.argv) > 2 else None
    for name, (module, help_text) in BUILDERS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted or wanted not in BUILDERS:  # skip importing the builders that are not run
            importlib.import_module(module).add_build_arguments(p)
    p = sub.add_parser("import", help="import data in another layout (PolyMNIST folders, MNIST-SVHN, CUB, "
                       "a table, webdataset shards)")
    if wanted not in BUILDERS:
        importlib.import_module("mmebm_dist.datasets.importers.cli").add_arguments(p)
    p = sub.add_parser("verify", help="check every shard against the manifest (sha256, counts, decoding)")
    p.add_argument("dir", help="data set directory holding manifest.json")
    p = sub.add_parser("info", help="summary of a built data set")
    p.add_argument("dir", help="data set directory holding manifest.json")
    p = sub.add_parser("convert", help="copy a data set with another image encoding")
    p.add_argument("src", help="data set directory holding manifest.json")
    p.add_argument("--encoding", required=True, choices=("png", "raw"), help="image encoding of the copy")
    p.add_argument("--out", required=True, help="new directory (must not exist; written atomically)")


def run(args: argparse.Namespace) -> int:
    from mmebm_dist.data import shards
    from mmebm_dist.data.sources import SourceError

    try:
        if args.data_command in BUILDERS or args.data_command == "import":
            start = time.perf_counter()
            if args.data_command == "import":
                manifest = importlib.import_module("mmebm_dist.datasets.importers.cli").run_import(args)
                args.out = args.out or args.src
            else:
                manifest = importlib.import_module(BUILDERS[args.data_command][0]).build_from_args(args)
            seconds = time.perf_counter() - start
            size = sum((Path(args.out) / s["name"]).stat().st_size for s in manifest["shards"])
            counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
            print(
                f"wrote {args.out}: {counts} samples, {len(manifest['shards'])} shards, "
                f"{size / 2**20:.1f} MiB in {seconds:.1f} s"
            )
            if shards.missing_summary(manifest):
                print(f"incomplete: {shards.missing_summary(manifest)}")
        elif args.data_command == "verify":
            checked = shards.verify(args.dir)
            print(f"{args.dir}: OK ({', '.join(f'{v} {k}' for k, v in checked.items())} checked)")
        elif args.data_command == "info":
            print(shards.info(args.dir))
        elif args.data_command == "convert":
            start = time.perf_counter()
            manifest = shards.convert(args.src, args.out, args.encoding)
            size = sum(s["bytes"] for s in manifest["shards"])
            print(
                f"wrote {args.out}: {len(manifest['shards'])} shards, {size / 2**20:.1f} MiB, images "
                f"{args.encoding}, in {time.perf_counter() - start:.1f} s"
            )
    except (shards.ShardError, SourceError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"mmebm data {args.data_command}: {exc}", file=sys.stderr)
        return 1
    return 0
