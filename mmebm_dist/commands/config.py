"""``mmebm config init --data DIR``: write a starter config whose modalities match a data set's manifest
(``mmebm_dist.datasets.starter`` writes it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmebm_dist.datasets.starter import PRIORS, StarterError, starter_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mmebm config init`` flags."""
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = sub.add_parser("init", help="write a starter config whose modalities match a data set")
    p.add_argument("--data", required=True, help="data set folder holding manifest.json")
    p.add_argument("--prior", choices=PRIORS, default="ebm", help="prior on z (default: ebm)")
    p.add_argument("--out", default=None, help="config file to write (default: print it)")
    p.add_argument("--steps", type=int, default=2000, help="train.steps (default: 2000)")
    p.add_argument("--batch-size", type=int, default=64, help="data.batch_size (capped at the train count)")
    p.add_argument("--run-dir", default=None, help="train.out_dir (default: runs/<data folder>_<prior>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from mmebm_dist.data.shards import ShardError

    try:
        text = starter_config(
            args.data, prior=args.prior, steps=args.steps, batch_size=args.batch_size, out_dir=args.run_dir
        )
        if args.out is None:
            sys.stdout.write(text)
            return 0
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    except (StarterError, ShardError, FileExistsError) as exc:
        print(f"mmebm config init: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: train it with `mmebm train --config {args.out}`")
    return 0
