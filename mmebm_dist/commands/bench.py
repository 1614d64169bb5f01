"""``mmebm bench {langevin,train,data,kernel-tiles,scaling}``: benchmarks printing tables or JSON; never
assert. Each benchmark's flags are here; its measurement is ``mmebm_dist.bench.<module>.run(options)``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable


def add_langevin_arguments(parser: argparse.ArgumentParser) -> None:
    import torch

    from mmebm_dist.prior.energy import ACTIVATIONS

    parser.add_argument("--batch", type=int, nargs="+", default=[16, 256, 1024], help="batch sizes B")
    parser.add_argument("--latent", type=int, default=32, help="latent width d")
    parser.add_argument("--hidden", type=int, default=200, help="hidden width H of the energy MLP")
    parser.add_argument("--layers", type=int, default=2, help="hidden layers L of the energy MLP (1-4)")
    parser.add_argument("--steps", type=int, default=60, help="Langevin steps K per chain")
    parser.add_argument("--long-steps", type=int, default=240,
                        help="K of the extra memory-vs-K row per backend (at the middle batch); 0 skips it")
    parser.add_argument("--step-size", type=float, default=0.4, help="Langevin step size s")
    parser.add_argument("--activation", default="leaky_relu", choices=ACTIVATIONS)
    parser.add_argument("--reference", default="laplace", choices=("laplace", "gaussian"))
    parser.add_argument("--backends", nargs="+", default=None, choices=("autograd", "torch", "triton"),
                        help="backends to time (default: autograd torch, plus triton on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="timed chains per row (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=None,
                        help="torch backend on CPU (sets $MMEBM_LANGEVIN_WORKERS): 0 = torch's intra-op "
                             "threads per op, N = N single-threaded row-split chains; default auto")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (configs/...)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="per-process batch (default: data.batch_size)"
    )
    parser.add_argument(
        "--steps", type=int, default=20, help="timed steps per measurement (default: %(default)s)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1, 2], help="process counts to measure (default: 1 2)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    parser.add_argument(
        "--no-laplace", action="store_true", help="skip the Laplace-prior baseline (EBM overhead)"
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="random batches of the modalities' shapes instead of the shards at data.path",
    )
    parser.add_argument(
        "--accelerate-config",
        default=None,
        metavar="YAML",
        help="launch several processes with this accelerate YAML (e.g. a DeepSpeed one in "
        "launch/accelerate/) instead of plain DDP; --processes overrides its count",
    )
    parser.add_argument(
        "--compile", nargs="+", default=None, metavar="MODE",
        help="train.compile modes to measure side by side, e.g. off default (default: the config's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per measurement")
    parser.add_argument("--out", default=None, help="also write the JSON lines to this file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/polymnist",
                        help="comma-separated data set directories (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per batch (default: 128)")
    parser.add_argument("--batches", type=int, default=100, help="timed batches per setting (default: 100)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (default: 0,1,2)")
    parser.add_argument("--shuffle-buffer", type=int, default=0, help="shuffle buffer (default: 0)")
    parser.add_argument("--split", default="train", help="split to stream (default: train)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument("--out", default=None, help="also write the JSON lines to this file")
    parser.add_argument("--markdown", default=None, metavar="MD",
                        help="also write the table, the command line and the CPU model to this file")


def _tile(text: str) -> tuple[int, int, int]:
    try:
        b, h, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile {text!r}: expected BxHxD, e.g. 16x32x32") from None
    return b, h, d


def add_tiles_arguments(parser: argparse.ArgumentParser) -> None:
    import torch

    from mmebm_dist.prior.energy import ACTIVATIONS

    parser.add_argument("--batch", type=int, nargs="+", default=[16, 256, 1024, 4096], help="batch sizes B")
    parser.add_argument("--latent", type=int, default=32, help="latent width d")
    parser.add_argument("--hidden", type=int, default=200, help="hidden width H")
    parser.add_argument("--layers", type=int, default=2, help="hidden layers L (1-4)")
    parser.add_argument("--steps", type=int, default=60, help="Langevin steps K")
    parser.add_argument("--step-size", type=float, default=0.4)
    parser.add_argument("--activation", default="gelu", choices=ACTIVATIONS)
    parser.add_argument("--reference", default="laplace", choices=("laplace", "gaussian"),
                        help="p0; under laplace the error includes rare sign flips of -sign(z) at z = 0 "
                             "(a jump of s^2), so gaussian shows the arithmetic error alone")
    parser.add_argument("--kernels", nargs="+", default=["resident", "streaming"],
                        choices=("resident", "streaming"), help="which Triton kernels to time")
    parser.add_argument("--tiles", type=_tile, nargs="+",
                        default=[(16, 32, 32), (16, 64, 32), (16, 128, 32), (32, 64, 64)],
                        metavar="BxHxD",
                        help="streaming kernel: BLOCK_B x BLOCK_H x BLOCK_D (powers of two >= 16)")
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64],
                        help="resident kernel: rows per program BLOCK_B (powers of two >= 16)")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="num_warps values")
    parser.add_argument("--precisions", nargs="+", default=["ieee", "tf32", "bf16"],
                        choices=("ieee", "tf32", "bf16"),
                        help="dot operands (fp32 accumulation, fp32 chain state in every case)")
    parser.add_argument("--repeats", type=int, default=10, help="timed chains per row (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")


def add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/polymnist_ebm.yaml", help="the model to scale")
    parser.add_argument("--step-log", default="docs/bench/h200_run1_train.log",
                        help="`mmebm bench train` output on the GPU (the step time)")
    parser.add_argument("--data-log", default="docs/bench/h200_check1_data.log",
                        help="`mmebm bench data` output (loader samples/s per worker)")
    parser.add_argument("--check-processes", type=int, default=4,
                        help="gloo processes for the communication check (0: skip it)")
    parser.add_argument("--check-config", default="configs/tiny.yaml", help="the model of the gloo check")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--figures", default=None, metavar="JSON",
                        help="render the document from figures an earlier --json wrote (measures nothing)")


BENCHES: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], str]] = {
    "langevin": ("mmebm_dist.bench.sampler", "LangevinBenchOptions", add_langevin_arguments,
                 "Langevin backends against autograd and the matmul roof"),
    "train": ("mmebm_dist.bench.train_step", "TrainBenchOptions", add_train_arguments,
              "training-step throughput, phase times, scaling, EBM overhead"),
    "data": ("mmebm_dist.bench.data", "DataBenchOptions", add_data_arguments,
             "loader samples/s with 0, 1 and 2 workers"),
    "kernel-tiles": ("mmebm_dist.bench.tiles", "TilesBenchOptions", add_tiles_arguments,
                     "Triton Langevin tiles and warps, timed and checked"),
    "scaling": ("mmebm_dist.bench.scaling", "ScalingBenchOptions", add_scaling_arguments,
                "a model of 8-512 GPUs under DDP/ZeRO, and a gloo check"),
}
"""Benchmark -> (its module, the options class its ``run`` takes, its flags, help)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    # Define only the flags of the benchmark being run; all of them when the command line is not ours (a
    # programmatic main([...]) call).
    wanted = [name for name in BENCHES if name in sys.argv[1:3]] or list(BENCHES)
    for name, (_, _, add_bench_arguments, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text)
        if name in wanted:
            add_bench_arguments(p)


def options_of(bench: str, args: argparse.Namespace):
    """The typed options of benchmark ``bench`` from its parsed flags."""
    module_name, class_name, _, _ = BENCHES[bench]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.bench][0])
    return int(module.run(options_of(args.bench, args)) or 0)
