"""``mmebm data``: build a data set (``polymnist``), ``verify`` its shards against the manifest, ``info``."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

# Builder name -> (module exposing add_build_arguments(parser) and build_from_args(args) -> manifest, help).
BUILDERS = {
    "polymnist": ("mmebm_dist.data.polymnist", "PolyMNIST-style M-view data from mnist, idx or fashion"),
    "mnist-svhn": ("mmebm_dist.data.mnist_svhn",
                   "MNIST paired per class with GENERATED street-number digits (an MNIST-SVHN stand-in)"),
    "birds": ("mmebm_dist.data.birds", "GENERATED birds with templated captions (a CUB stand-in)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    wanted = sys.argv[2] if len(sys.argv) > 2 else None
    for name, (module, help_text) in BUILDERS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted or wanted not in BUILDERS:  # skip importing the builders that are not run
            importlib.import_module(module).add_build_arguments(p)
    p = sub.add_parser("verify", help="check every shard against the manifest (sha256, counts, decoding)")
    p.add_argument("dir", help="data set directory holding manifest.json")
    p = sub.add_parser("info", help="summary of a built data set")
    p.add_argument("dir", help="data set directory holding manifest.json")


def run(args: argparse.Namespace) -> int:
    from mmebm_dist.data import shards
    from mmebm_dist.data.sources import SourceError

    try:
        if args.data_command in BUILDERS:
            start = time.perf_counter()
            manifest = importlib.import_module(BUILDERS[args.data_command][0]).build_from_args(args)
            seconds = time.perf_counter() - start
            size = sum((Path(args.out) / s["name"]).stat().st_size for s in manifest["shards"])
            counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
            print(
                f"wrote {args.out}: {counts} samples, {len(manifest['shards'])} shards, "
                f"{size / 2**20:.1f} MiB in {seconds:.1f} s"
            )
        elif args.data_command == "verify":
            checked = shards.verify(args.dir)
            print(f"{args.dir}: OK ({', '.join(f'{v} {k}' for k, v in checked.items())} checked)")
        elif args.data_command == "info":
            print(shards.info(args.dir))
    except (shards.ShardError, SourceError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"mmebm data {args.data_command}: {exc}", file=sys.stderr)
        return 1
    return 0
