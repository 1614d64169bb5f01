"""``mmebm bench {langevin,train,data,kernel-tiles,scaling}``: benchmarks printing tables or JSON; never
assert."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHES = {
    "langevin": ("mmebm_dist.bench.sampler", "Langevin backends against autograd and the matmul roof"),
    "train": ("mmebm_dist.bench.train_step", "training-step throughput, phase times, scaling, EBM overhead"),
    "data": ("mmebm_dist.bench.data", "loader samples/s with 0, 1 and 2 workers"),
    "kernel-tiles": ("mmebm_dist.bench.tiles", "Triton Langevin tiles and warps, timed and checked"),
    "scaling": ("mmebm_dist.bench.scaling", "a model of 8-512 GPUs under DDP/ZeRO, and a gloo check"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    # Import only the benchmark being run (each pulls in different heavy modules); all of them when the
    # command line is not ours (a programmatic main([...]) call).
    wanted = [name for name in BENCHES if name in sys.argv[1:3]] or list(BENCHES)
    for name, (module, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text)
        if name in wanted:
            importlib.import_module(module).add_arguments(p)


def run(args) -> int:
    return int(importlib.import_module(BENCHES[args.bench][0]).run(args) or 0)
