"""``mmebm data import FORMAT SRC [--out DIR]``: the flags of each format and the dispatch to its importer."""

from __future__ import annotations

import argparse
from typing import Any

from mmebm_dist.commands.argtypes import image_size, modality_kind, positive_int

FORMATS = {
    "polymnist-folders": "PolyMNIST as its authors distribute it: SRC/{train,test}/m{k}/{i}.{label}.png",
    "mnist-svhn": "real SVHN (SRC/{train,test}_32x32.mat) + MNIST IDX files, paired per class as MMVAE",
    "cub-captions": "CUB images SRC/{train,test}/<class>/ + text_{trainval,test}classes.txt (10 per image)",
    "table": "a JSONL or CSV table, one row per tuple (--modality NAME=image|npy|text)",
    "webdataset": "existing tar shards: scan, verify, write manifest.json beside them (no rewrite)",
}


ALLOW_MISSING = {  # the formats whose tuples can lack a modality, and what that looks like in each
    "polymnist-folders": "a file missing from some modality folders: import the tuple without those "
                         "modalities (an incomplete set) instead of stopping",
    "table": "a row with an empty cell or a missing file: import it without that modality (an incomplete "
             "set) instead of stopping; a row needs one modality at least",
    "webdataset": "a sample without some modality's entry: index it as an incomplete set instead of "
                  "stopping",
    "cub-captions": "an empty caption line: import that tuple without its caption (an incomplete set)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-parser per format, each with SRC, --out, --workers, --shard-size, --overwrite."""
    sub = parser.add_subparsers(dest="import_format", metavar="FORMAT", required=True)
    for name, help_text in FORMATS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("src", help="the source folder (the table file for 'table')")
        p.add_argument(
            "--out",
            required=name != "webdataset",
            help="output folder (written atomically)"
            if name != "webdataset"
            else "must be SRC or omitted: the manifest is written beside the shards",
        )
        p.add_argument("--workers", type=int, default=0, help="processes (default 0: all cores)")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace --out if it exists (webdataset: replace manifest.json)",
        )
        if name != "webdataset":
            p.add_argument("--shard-size", type=positive_int, default=1000, help="tuples per shard")
        if name in ALLOW_MISSING:
            p.add_argument("--allow-missing", action="store_true", help=ALLOW_MISSING[name])
        if name in ("polymnist-folders", "table"):
            p.add_argument(
                "--resize",
                type=image_size,
                default=None,
                metavar="HxW",
                help="resize every image to HxW (default: sizes must agree)",
            )
    p = sub.choices["mnist-svhn"]
    p.add_argument("--mnist-dir", default=None, help="folder of MNIST IDX files (default: SRC)")
    p.add_argument("--factor", type=positive_int, default=30, help="permutations per class (MMVAE: 30)")
    p.add_argument(
        "--max-per-class", type=positive_int, default=10000, help="images per class (MMVAE: 10000)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the pairing")
    p = sub.choices["cub-captions"]
    p.add_argument("--resize", type=image_size, default=(64, 64), metavar="HxW",
                   help="image size (MMVAE: 64x64)")
    p.add_argument(
        "--max-tokens", type=positive_int, default=32, help="caption length with <eos> (MMVAE: 32)"
    )
    p.add_argument(
        "--min-count",
        type=positive_int,
        default=4,
        help="train occurrences a word needs to get an id (MMVAE: more than 3)",
    )
    p = sub.choices["table"]
    p.add_argument(
        "--modality",
        type=modality_kind,
        action="append",
        required=True,
        metavar="NAME=KIND",
        help="a column and its kind: image (path), npy (path) or text (inline); repeat per modality",
    )
    p.add_argument("--label", default=None, metavar="COLUMN", help="integer label column (optional)")
    p.add_argument("--key", default=None, metavar="COLUMN", help="unique id column (duplicates are errors)")
    p.add_argument(
        "--on-missing",
        choices=("error", "skip"),
        default="error",
        help="a row without some modality: error (default) or skip and count it",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="rows held out for test when the table has no 'split' column",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out rows")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="text length with <eos>")
    p = sub.choices["webdataset"]
    p.add_argument("--train-glob", default="*train*.tar", help="train shard file names")
    p.add_argument("--test-glob", default="*test*.tar", help="test shard file names")


def run_import(args: argparse.Namespace) -> dict[str, Any]:
    """Run the importer of ``args.import_format``; its manifest."""
    common = {"workers": args.workers, "overwrite": args.overwrite}
    fmt = args.import_format
    if fmt in ALLOW_MISSING:
        common["allow_missing"] = args.allow_missing
    if fmt == "webdataset":
        from mmebm_dist.datasets.importers.webdataset import import_webdataset

        return import_webdataset(
            args.src, args.out, train_glob=args.train_glob, test_glob=args.test_glob, **common
        )
    common["shard_size"] = args.shard_size
    if fmt == "polymnist-folders":
        from mmebm_dist.datasets.importers.polymnist_folders import import_polymnist_folders

        return import_polymnist_folders(args.src, args.out, resize=args.resize, **common)
    if fmt == "mnist-svhn":  # paired from whole arrays: no tuple can lack a modality
        from mmebm_dist.datasets.importers.mnist_svhn import import_mnist_svhn

        return import_mnist_svhn(
            args.src,
            args.out,
            mnist_dir=args.mnist_dir,
            factor=args.factor,
            max_per_class=args.max_per_class,
            seed=args.seed,
            **common,
        )
    if fmt == "cub-captions":
        from mmebm_dist.datasets.importers.cub_captions import import_cub_captions

        return import_cub_captions(
            args.src,
            args.out,
            resize=args.resize,
            max_tokens=args.max_tokens,
            min_count=args.min_count,
            **common,
        )
    from mmebm_dist.datasets.importers.table import import_table

    return import_table(
        args.src,
        args.out,
        modalities=args.modality,
        label=args.label,
        key=args.key,
        on_missing=args.on_missing,
        test_fraction=args.test_fraction,
        seed=args.seed,
        resize=args.resize,
        max_tokens=args.max_tokens,
        **common,
    )
