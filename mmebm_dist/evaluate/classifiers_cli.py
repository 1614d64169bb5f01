"""``mmebm classifiers train --data DIR``: train the classifiers that judge coherence on the real shards.

Digit data sets (PolyMNIST, MNIST-SVHN; any shapes): one digit classifier per modality. The generated birds:
the image attribute classifier of :mod:`mmebm_dist.evaluate.judges.birds` (captions are read exactly, so they
need none). Reports test accuracy and saves with the data's manifest hash (evaluation refuses classifiers
trained on other data).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

TARGET_ACCURACY = 0.95
DIGIT_DEFAULTS = {"batch_size": 128, "lr": 3e-3, "width": 2}
BIRDS_DEFAULTS = {"batch_size": 64, "lr": 1e-3, "width": 32, "steps": 1500}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("train", help="train the coherence classifiers on a dataset's train split")
    p.add_argument("--data", required=True, help="dataset directory written by `mmebm data`")
    p.add_argument("--out", default=None, help="output directory (default: DATA/classifiers)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the train split (digit classifiers)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of the birds attribute classifier "
                        f"(default {BIRDS_DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default {DIGIT_DEFAULTS['batch_size']} (birds: {BIRDS_DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate, default {DIGIT_DEFAULTS['lr']} (the digit reference: 1e-3; "
                        f"birds: {BIRDS_DEFAULTS['lr']})")
    p.add_argument("--width", type=int, default=None,
                   help=f"channel multiplier of the MoPoE/MMVAE+ CNN, default {DIGIT_DEFAULTS['width']} (the "
                        f"reference: 1, i.e. 10/20 channels); birds: base channels, default "
                        f"{BIRDS_DEFAULTS['width']}")
    p.add_argument("--conv-dropout", type=float, default=0.1, help="2-D dropout after each conv (ref.: 0.5)")
    p.add_argument("--fc-dropout", type=float, default=0.2, help="dropout after the hidden fc (ref.: 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle-buffer", type=int, default=2000, help="samples in the shuffle buffer")
    p.add_argument("--num-workers", type=int, default=1, help="data-loader workers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _setting(args: argparse.Namespace, name: str, defaults: dict) -> float:
    value = getattr(args, name)
    return defaults[name] if value is None else value


def run(args: argparse.Namespace) -> int:
    from mmebm_dist.evaluate.judges.birds import is_birds

    if is_birds(args.data):
        return train_birds(args)
    if args.steps is not None:
        raise SystemExit(f"--steps applies to the birds attribute classifier; '{args.data}' is not a birds "
                         "data set: use --epochs")
    return train_digits(args)


def train_digits(args: argparse.Namespace) -> int:
    """One digit classifier per modality (the CNN takes each modality's own shape)."""
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
    batch_size = int(_setting(args, "batch_size", DIGIT_DEFAULTS))
    lr = float(_setting(args, "lr", DIGIT_DEFAULTS))
    width = int(_setting(args, "width", DIGIT_DEFAULTS))
    bundle = ClassifierBundle(specs, manifest_hash=data_hash, width=width,
                              conv_dropout=args.conv_dropout, fc_dropout=args.fc_dropout)
    per_epoch = epoch_batches(data, batch_size=batch_size, world_size=1, num_workers=args.num_workers)

    def train_batches(epoch: int):
        return make_loader(data, batch_size=batch_size, split="train", seed=args.seed, epoch=epoch,
                           shuffle_buffer=args.shuffle_buffer, rank=0, world_size=1,
                           num_workers=args.num_workers)

    losses = train_classifiers(bundle, train_batches, epochs=args.epochs, lr=lr, seed=args.seed,
                               batches_per_epoch=per_epoch, device=device)
    test = make_loader(data, batch_size=512, split="test", rank=0, world_size=1, num_workers=args.num_workers)
    bundle.test_accuracy = evaluate_accuracy(bundle, test, show_progress=True)
    seconds = time.perf_counter() - start
    bundle.save(out, extra={"data_path": str(data), "epochs": args.epochs, "batch_size": batch_size,
                            "lr": lr, "seed": args.seed, "train_loss_per_epoch": losses,
                            "seconds": seconds})
    print(f"classifiers for data {data} (manifest hash {data_hash[:12]}...), {args.epochs} epoch(s), "
          f"{seconds:.0f} s:")
    for name, acc in bundle.test_accuracy.items():
        note = (f"  (below {TARGET_ACCURACY}: train longer, e.g. --epochs {2 * args.epochs})"
                if acc < TARGET_ACCURACY else "")
        print(f"  {name}: test accuracy {acc:.4f}{note}")
    print(f"saved to {out}")
    return 0


def train_birds(args: argparse.Namespace) -> int:
    """The image attribute classifier of the generated birds, cached as OUT/attribute_classifier.pt."""
    from mmebm_dist.data.shards import manifest_hash
    from mmebm_dist.data.text import VOCAB_FILE, Vocabulary
    from mmebm_dist.evaluate.generate import resolve_device
    from mmebm_dist.evaluate.judges import birds as bc

    start = time.perf_counter()
    data = Path(args.data)
    Vocabulary.load(data / VOCAB_FILE)  # fail early on a damaged data set
    out = Path(args.out) if args.out else data / bc.CLASSIFIER_DIR
    settings = {name: _setting(args, name, BIRDS_DEFAULTS) for name in ("steps", "batch_size", "lr", "width")}
    model, accuracy = bc.train_attribute_classifier(
        data, steps=int(settings["steps"]), batch_size=int(settings["batch_size"]), lr=float(settings["lr"]),
        width=int(settings["width"]), seed=args.seed, device=resolve_device(args.device))
    data_hash = manifest_hash(data)
    out.mkdir(parents=True, exist_ok=True)
    path = bc.classifier_path(out)
    bc.save_classifier(model.cpu(), accuracy, path, data_hash)
    seconds = time.perf_counter() - start
    bc.save_summary(out / bc.SUMMARY_FILE, {"data_path": str(data), "manifest_hash": data_hash,
                                            "test_accuracy": accuracy, "seed": args.seed, "seconds": seconds,
                                            **settings})
    print(f"attribute classifier for birds data {data} (manifest hash {data_hash[:12]}...), "
          f"{settings['steps']} steps, {seconds:.0f} s; captions are read exactly (no classifier):")
    for name, acc in accuracy.items():
        print(f"  {name}: test accuracy {acc:.4f}")
    print(f"saved to {path}")
    return 0
