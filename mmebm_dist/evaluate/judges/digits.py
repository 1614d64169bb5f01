"""The judge of digit data sets (PolyMNIST, MNIST-SVHN; any shapes): one digit classifier per modality.

A generated modality states the label its classifier predicts; every modality of a test tuple fixes the
tuple's label. The classifiers are :class:`mmebm_dist.evaluate.classifiers.ClassifierBundle`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mmebm_dist.config import OptionError
from mmebm_dist.evaluate.interfaces import Predictor
from mmebm_dist.evaluate.judges.options import TrainOptions

TARGET_ACCURACY = 0.95
DEFAULTS = {"batch_size": 128, "lr": 3e-3, "width": 2}
"""``mmebm classifiers train`` settings left unset on the command line."""


class DigitJudge:
    """Class labels as the one attribute: ``read`` is the classifier's label, ``known`` the tuple's label."""

    attributes = None

    def __init__(self, classifiers: Predictor, directory: str | os.PathLike = ""):
        self.classifiers = classifiers
        self.directory = str(directory)

    @property
    def test_accuracy(self) -> dict[str, float]:
        """Test accuracy of each modality's classifier."""
        return self.classifiers.test_accuracy

    def read(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.classifiers.predict(name, x).long().reshape(-1, 1)

    def known(self, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["label"].long().reshape(-1, 1)

    def describe(self) -> dict:
        return {"dir": self.directory, "manifest_hash": self.classifiers.manifest_hash,
                "test_accuracy": self.test_accuracy}


def load_judge(classifier_dir: str | os.PathLike, data_dir: str | os.PathLike, *, manifest_hash: str | None,
               modalities: Sequence[str] | None = None, device: torch.device | str = "cpu") -> DigitJudge:
    """The digit classifiers cached in ``classifier_dir`` (refused when trained on other data or when they
    lack one of ``modalities``)."""
    from mmebm_dist.evaluate.classifiers import load_classifiers

    bundle = load_classifiers(classifier_dir, manifest_hash=manifest_hash, data_path=data_dir,
                              modalities=modalities, device=device)
    return DigitJudge(bundle, classifier_dir)


def read_test_chunks(data_dir: str | os.PathLike, *, num: int, batch_size: int, rank: int = 0,
                     world_size: int = 1) -> list[dict[str, torch.Tensor] | None]:
    """The first ``num`` test tuples in chunks of ``batch_size`` (``evaluate.generate.read_chunks``)."""
    from mmebm_dist.evaluate.generate import read_chunks

    return read_chunks(data_dir, num=num, batch_size=batch_size, rank=rank, world_size=world_size)


def _setting(options: TrainOptions, name: str) -> float:
    value = getattr(options, name)
    return DEFAULTS[name] if value is None else value


def train(options: TrainOptions) -> int:
    """``mmebm classifiers train`` on a digit data set: one classifier per modality (the CNN takes each
    modality's own shape), saved with the data's manifest hash."""
    from mmebm_dist.data.shards import manifest_hash, read_manifest
    from mmebm_dist.data.stream import epoch_batches, make_loader
    from mmebm_dist.evaluate.classifiers import (
        ClassifierBundle,
        ModalitySpec,
        evaluate_accuracy,
        train_classifiers,
    )
    from mmebm_dist.evaluate.generate import resolve_device

    if options.steps is not None:
        raise OptionError(f"--steps applies to the birds attribute classifier; '{options.data}' is not a "
                          "birds data set: use --epochs")
    start = time.perf_counter()
    data = Path(options.data)
    manifest = read_manifest(data)
    data_hash = manifest_hash(data)
    specs = [ModalitySpec(m["name"], tuple(m["shape"])) for m in manifest["modalities"]]
    device = resolve_device(options.device)
    out = Path(options.out) if options.out else data / "classifiers"
    batch_size = int(_setting(options, "batch_size"))
    lr = float(_setting(options, "lr"))
    width = int(_setting(options, "width"))
    bundle = ClassifierBundle(specs, manifest_hash=data_hash, width=width,
                              conv_dropout=options.conv_dropout, fc_dropout=options.fc_dropout)
    per_epoch = epoch_batches(data, batch_size=batch_size, world_size=1, num_workers=options.num_workers)

    def train_batches(epoch: int):
        return make_loader(data, batch_size=batch_size, split="train", seed=options.seed, epoch=epoch,
                           shuffle_buffer=options.shuffle_buffer, rank=0, world_size=1,
                           num_workers=options.num_workers)

    losses = train_classifiers(bundle, train_batches, epochs=options.epochs, lr=lr, seed=options.seed,
                               batches_per_epoch=per_epoch, device=device)
    test = make_loader(data, batch_size=512, split="test", rank=0, world_size=1,
                       num_workers=options.num_workers)
    bundle.test_accuracy = evaluate_accuracy(bundle, test, show_progress=True)
    seconds = time.perf_counter() - start
    bundle.save(out, extra={"data_path": str(data), "epochs": options.epochs, "batch_size": batch_size,
                            "lr": lr, "seed": options.seed, "train_loss_per_epoch": losses,
                            "seconds": seconds})
    print(f"classifiers for data {data} (manifest hash {data_hash[:12]}...), {options.epochs} epoch(s), "
          f"{seconds:.0f} s:")
    for name, acc in bundle.test_accuracy.items():
        note = (f"  (below {TARGET_ACCURACY}: train longer, e.g. --epochs {2 * options.epochs})"
                if acc < TARGET_ACCURACY else "")
        print(f"  {name}: test accuracy {acc:.4f}{note}")
    print(f"saved to {out}")
    return 0
