"""``mmebm bench data``: loader samples/s with 0, 1 and 2 workers on built shards (table, or JSON lines)."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/polymnist", help="data set directory (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per batch (default: 128)")
    parser.add_argument("--batches", type=int, default=100, help="timed batches per setting (default: 100)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (default: 0,1,2)")
    parser.add_argument("--shuffle-buffer", type=int, default=0, help="shuffle buffer (default: 0)")
    parser.add_argument("--split", default="train", help="split to stream (default: train)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument("--out", default=None, help="also write the JSON lines to this file")


def measure(
    data: str, *, batch_size: int, batches: int, num_workers: int, shuffle_buffer: int, split: str
) -> dict:
    """Time ``batches`` batches after the first one (start-up, incl. worker launch, is reported apart)."""
    from mmebm_dist.data.stream import make_loader

    loader = make_loader(
        data,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        rank=0,
        world_size=1,
        split=split,
        resampled=True,
    )
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    ready = time.perf_counter()
    samples = 0
    for _ in range(batches):
        samples += len(next(it)["label"])
    end = time.perf_counter()
    del it
    return {
        "bench": "data",
        "data": data,
        "split": split,
        "workers": num_workers,
        "batch_size": batch_size,
        "batches": batches,
        "samples": samples,
        "seconds": end - ready,
        "samples_per_s": samples / (end - ready),
        "startup_s": ready - start,
        "modalities": [k for k in first if k != "label"],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def run(args: argparse.Namespace) -> int:
    rows = []
    for w in (int(x) for x in args.workers.split(",")):
        rows.append(
            measure(
                args.data,
                batch_size=args.batch_size,
                batches=args.batches,
                num_workers=w,
                shuffle_buffer=args.shuffle_buffer,
                split=args.split,
            )
        )
        rows[-1]["ratio_to_first"] = rows[-1]["samples_per_s"] / rows[0]["samples_per_s"]
    lines = [json.dumps(r) for r in rows]
    if args.json:
        print("\n".join(lines))
    else:
        print(
            f"loader on {args.data} ({args.split}, batch {args.batch_size}, {args.batches} timed batches, "
            f"{os.cpu_count()} CPUs)"
        )
        print(f"{'workers':>8} {'samples/s':>10} {'ms/batch':>9} {'startup s':>10} {'ratio':>6}")
        for r in rows:
            print(
                f"{r['workers']:>8} {r['samples_per_s']:>10.0f} {1e3 * r['seconds'] / r['batches']:>9.1f} "
                f"{r['startup_s']:>10.2f} {r['ratio_to_first']:>6.2f}"
            )
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0
