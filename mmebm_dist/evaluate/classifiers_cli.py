"""``mmebm classifiers train --data DIR``: train one digit classifier per modality on the real shards.

Reports each classifier's test accuracy and saves the bundle with the data's manifest hash (evaluation
refuses classifiers trained on other data).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

TARGET_ACCURACY = 0.95


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("train", help="train the per-modality classifiers on a dataset's train split")
    p.add_argument("--data", required=True, help="dataset directory written by `mmebm data`")
    p.add_argument("--out", default=None, help="output directory (default: DATA/classifiers)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the train split")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (the reference: 1e-3)")
    p.add_argument("--width", type=int, default=2,
                   help="channel multiplier of the MoPoE/MMVAE+ CNN (the reference: 1, i.e. 10/20 channels)")
    p.add_argument("--conv-dropout", type=float, default=0.1, help="2-D dropout after each conv (ref.: 0.5)")
    p.add_argument("--fc-dropout", type=float, default=0.2, help="dropout after the hidden fc (ref.: 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle-buffer", type=int, default=2000, help="samples in the shuffle buffer")
    p.add_argument("--num-workers", type=int, default=1, help="data-loader workers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    from mmebm_dist.data.shards import manifest_hash, read_manifest
    from mmebm_dist.data.stream import epoch_batches, make_loader
    from mmebm_dist.evaluate.classifiers import (
        ClassifierBundle,
        ModalitySpec,
        evaluate_accuracy,
        train_classifiers,
    )
    from mmebm_dist.evaluate.generate import resolve_device

    start = time.perf_counter()
    data = Path(args.data)
    manifest = read_manifest(data)
    data_hash = manifest_hash(data)
    specs = [ModalitySpec(m["name"], tuple(m["shape"])) for m in manifest["modalities"]]
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else data / "classifiers"
    bundle = ClassifierBundle(specs, manifest_hash=data_hash, width=args.width,
                              conv_dropout=args.conv_dropout, fc_dropout=args.fc_dropout)
    per_epoch = epoch_batches(data, batch_size=args.batch_size, world_size=1, num_workers=args.num_workers)

    def train_batches(epoch: int):
        return make_loader(data, batch_size=args.batch_size, split="train", seed=args.seed, epoch=epoch,
                           shuffle_buffer=args.shuffle_buffer, rank=0, world_size=1,
                           num_workers=args.num_workers)

    losses = train_classifiers(bundle, train_batches, epochs=args.epochs, lr=args.lr, seed=args.seed,
                               batches_per_epoch=per_epoch, device=device)
    test = make_loader(data, batch_size=512, split="test", rank=0, world_size=1, num_workers=args.num_workers)
    bundle.test_accuracy = evaluate_accuracy(bundle, test, show_progress=True)
    seconds = time.perf_counter() - start
    bundle.save(out, extra={"data_path": str(data), "epochs": args.epochs, "batch_size": args.batch_size,
                            "lr": args.lr, "seed": args.seed, "train_loss_per_epoch": losses,
                            "seconds": seconds})
    print(f"classifiers for data {data} (manifest hash {data_hash[:12]}...), {args.epochs} epoch(s), "
          f"{seconds:.0f} s:")
    for name, acc in bundle.test_accuracy.items():
        note = "" if acc >= TARGET_ACCURACY else f"  (below {TARGET_ACCURACY}: train longer, e.g. --epochs 4)"
        print(f"  {name}: test accuracy {acc:.4f}{note}")
    print(f"saved to {out}")
    return 0
