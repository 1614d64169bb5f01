"""Per-modality digit classifiers that judge coherence, saved with the manifest hash of their training data.

The image network is the PolyMNIST classifier of MoPoE / MMVAE+ (conv C->10 and 10->20, 4x4 stride 2,
dropout, fc 980 -> 128 -> 10 at 28x28) with a ``width`` multiplier and adjustable dropout. The reference is
width 1 with dropout 0.5 everywhere; the defaults (width 2, dropout 0.1 / 0.2) are the "slightly stronger"
variant that reaches higher accuracy in the 1-2 epochs a CPU affords. Vector modalities get an MLP.
A bundle refuses to judge data whose manifest hash differs from the one it was trained on: its accuracy
(which bounds every coherence figure) would be unknown there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mmebm_dist.evaluate.interfaces import NUM_CLASSES, Batch

FORMAT_VERSION = 1
BUNDLE_FILE = "classifiers.pt"
SUMMARY_FILE = "classifiers.json"


class ClassifierMismatchError(ValueError):
    """Classifiers trained on other data (or other modalities) than the data being evaluated."""


@dataclass(frozen=True)
class ModalitySpec:
    """Name and per-sample shape of one modality, as the shard manifest declares it."""

    name: str
    shape: tuple[int, ...]


class ImageClassifier(nn.Module):
    """The PolyMNIST classifier of MoPoE / MMVAE+: two 4x4 stride-2 convs (10, 20 channels times ``width``)
    with 2-D dropout, fc -> 128 with dropout, fc -> classes. 28x28 inputs flatten to 20 * 7 * 7 = 980 at
    width 1 (the reference uses dropout 0.5 in both places)."""

    def __init__(self, shape: tuple[int, ...], width: int = 1, num_classes: int = NUM_CLASSES, *,
                 conv_dropout: float = 0.5, fc_dropout: float = 0.5):
        super().__init__()
        channels = shape[0]
        c1, c2 = 10 * width, 20 * width
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 4, stride=2, padding=1), nn.Dropout2d(conv_dropout), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.Dropout2d(conv_dropout), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *shape)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, 128), nn.Dropout(fc_dropout), nn.ReLU(),
                                  nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] of images [B, C, H, W] in [0, 1]."""
        return self.head(self.features(x))


class VectorClassifier(nn.Module):
    """A two-hidden-layer MLP for modalities of shape (D,)."""

    def __init__(self, shape: tuple[int, ...], width: int = 1, num_classes: int = NUM_CLASSES, *,
                 conv_dropout: float = 0.0, fc_dropout: float = 0.2):
        super().__init__()
        hidden = 128 * width
        self.net = nn.Sequential(nn.Linear(shape[0], 2 * hidden), nn.ReLU(), nn.Dropout(fc_dropout),
                                 nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def make_classifier(spec: ModalitySpec, width: int = 1, num_classes: int = NUM_CLASSES,
                    **dropout: float) -> nn.Module:
    """The classifier network for one modality's shape: CNN for (C, H, W) with H, W >= 4, MLP for (D,)."""
    if len(spec.shape) == 3 and min(spec.shape[1:]) >= 4:
        return ImageClassifier(spec.shape, width, num_classes, **dropout)
    if len(spec.shape) == 1:
        return VectorClassifier(spec.shape, width, num_classes, **dropout)
    raise ValueError(f"modality '{spec.name}': no classifier for shape {spec.shape}; "
                     "expected (C, H, W) with H, W >= 4 or (D,)")


class ClassifierBundle(nn.Module):
    """One classifier per modality plus the manifest hash of the data they were trained on."""

    def __init__(self, specs: Sequence[ModalitySpec], *, manifest_hash: str, width: int = 2,
                 num_classes: int = NUM_CLASSES, conv_dropout: float = 0.1, fc_dropout: float = 0.2):
        super().__init__()
        self.specs = list(specs)
        self.manifest_hash = manifest_hash
        self.width = width
        self.dropout = {"conv_dropout": conv_dropout, "fc_dropout": fc_dropout}
        self.num_classes = num_classes
        self.test_accuracy: dict[str, float] = {}
        self.nets = nn.ModuleDict({s.name: make_classifier(s, width, num_classes, **self.dropout)
                                   for s in self.specs})

    @property
    def modalities(self) -> list[str]:
        return [s.name for s in self.specs]

    @torch.no_grad()
    def predict(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Labels int64 [B] for the batch x [B, *shape] of modality ``name`` (eval mode, no grad)."""
        if name not in self.nets:
            raise KeyError(f"no classifier for modality '{name}'; these exist: {', '.join(self.nets)}")
        net = self.nets[name]
        was_training = net.training
        net.eval()
        param = next(net.parameters())
        logits = net(x.to(device=param.device, dtype=param.dtype))
        net.train(was_training)
        return logits.argmax(-1).to(x.device)

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write ``classifiers.pt`` (weights + metadata) and a readable ``classifiers.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "manifest_hash": self.manifest_hash,
            "modalities": [{"name": s.name, "shape": list(s.shape)} for s in self.specs],
            "width": self.width,
            **self.dropout,
            "num_classes": self.num_classes,
            "test_accuracy": self.test_accuracy,
            **(extra or {}),
        }
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        tmp = directory / (BUNDLE_FILE + ".tmp")
        torch.save({"meta": meta, "state_dict": state}, tmp)
        tmp.replace(directory / BUNDLE_FILE)
        (directory / SUMMARY_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory / BUNDLE_FILE


def _twin_hash(data_path: str | Path | None) -> str | None:
    """The manifest hash of the complete twin of an incomplete data set (the same tuples with every modality:
    classifiers trained on it judge this set too), or None."""
    from mmebm_dist.data.shards import read_manifest

    if data_path is None or not (Path(data_path) / "manifest.json").is_file():
        return None
    return read_manifest(data_path).get("presence", {}).get("complete_manifest_hash")


def load_classifiers(directory: str | Path, *, manifest_hash: str | None, data_path: str | Path | None = None,
                     modalities: Sequence[str] | None = None,
                     device: torch.device | str = "cpu") -> ClassifierBundle:
    """Load a bundle written by :meth:`ClassifierBundle.save`, refusing it when its training data's manifest
    hash differs from ``manifest_hash`` (or, for an incomplete ``data_path``, its complete twin's) or when it
    lacks one of ``modalities``."""
    directory = Path(directory)
    path = directory / BUNDLE_FILE
    fix = f"mmebm classifiers train --data {data_path or 'DATA_DIR'} --out {directory}"
    if not path.is_file():
        raise FileNotFoundError(f"no trained classifiers at '{path}'; train them with: {fix}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob["meta"]
    if meta.get("format_version") != FORMAT_VERSION:
        raise ClassifierMismatchError(
            f"'{path}' has classifier format version {meta.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; retrain them with: {fix}")
    if manifest_hash is not None and meta["manifest_hash"] not in (manifest_hash, _twin_hash(data_path)):
        raise ClassifierMismatchError(
            f"classifiers in '{directory}' were trained on data with manifest hash {meta['manifest_hash']}, "
            f"but the data being evaluated ({data_path or 'unknown path'}) has manifest hash "
            f"{manifest_hash}. Their accuracy on this data is unknown, so coherence would be meaningless. "
            f"Retrain them on this data with: {fix}  (or pass --classifiers pointing at classifiers trained "
            f"on it)")
    specs = [ModalitySpec(m["name"], tuple(m["shape"])) for m in meta["modalities"]]
    missing = [m for m in (modalities or []) if m not in {s.name for s in specs}]
    if missing:
        raise ClassifierMismatchError(
            f"classifiers in '{directory}' cover modalities {[s.name for s in specs]} but not {missing}; "
            f"retrain them with: {fix}")
    bundle = ClassifierBundle(specs, manifest_hash=meta["manifest_hash"], width=meta["width"],
                              num_classes=meta["num_classes"], conv_dropout=meta.get("conv_dropout", 0.5),
                              fc_dropout=meta.get("fc_dropout", 0.5))  # dropout is inactive in eval
    try:
        bundle.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ClassifierMismatchError(f"'{path}' holds weights of another classifier architecture ({exc}); "
                                      f"retrain them with: {fix}") from exc
    bundle.test_accuracy = dict(meta.get("test_accuracy", {}))
    return bundle.to(device).eval()


# ------------------------------------------------------------------------------------------------ training


def train_classifiers(bundle: ClassifierBundle, train_batches: Callable[[int], Iterable[Batch]], *,
                      epochs: int, lr: float = 1e-3, seed: int = 0, batches_per_epoch: int | None = None,
                      device: torch.device | str = "cpu", show_progress: bool = True) -> list[float]:
    """Train every classifier of ``bundle`` on its modality with cross-entropy (Adam), in one pass over each
    epoch's batches (``train_batches(epoch)`` yields batch dicts with ``label``). Returns mean loss per epoch.
    """
    torch.manual_seed(seed)
    bundle.to(device).train()
    optimiser = torch.optim.Adam(bundle.parameters(), lr=lr)
    losses = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        bar = tqdm(train_batches(epoch), total=batches_per_epoch, unit="batch", disable=not show_progress,
                   desc=f"classifiers epoch {epoch + 1}/{epochs}")
        for batch in bar:
            loss = sum(F.cross_entropy(bundle.nets[name](batch[name][rows].to(device)),
                                       batch["label"][rows].to(device))
                       for name, rows in _held(bundle, batch).items())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() / len(bundle.specs)
            count += 1
            if count % 20 == 0:
                bar.set_postfix(loss=f"{total / count:.3f}")
        if count == 0:
            raise ValueError(f"epoch {epoch}: the training split yielded no batches; is the data empty?")
        losses.append(total / count)
    bundle.eval()
    return losses


@torch.no_grad()
def evaluate_accuracy(bundle: ClassifierBundle, batches: Iterable[Batch],
                      show_progress: bool = False) -> dict[str, float]:
    """Accuracy of every classifier on ``batches`` (a finite iterable of batch dicts with ``label``)."""
    correct = dict.fromkeys(bundle.modalities, 0)
    total = dict.fromkeys(bundle.modalities, 0)
    for batch in tqdm(batches, desc="classifier accuracy", unit="batch", disable=not show_progress):
        label = batch["label"].cpu()
        for name, rows in _held(bundle, batch).items():
            correct[name] += (bundle.predict(name, batch[name][rows]).cpu() == label[rows]).sum().item()
            total[name] += label[rows].numel()
    if not any(total.values()):
        raise ValueError("no batches to measure classifier accuracy on; is the split empty?")
    return {name: correct[name] / total[name] if total[name] else math.nan for name in bundle.modalities}


def _held(bundle: ClassifierBundle, batch: Batch) -> dict[str, slice | torch.Tensor]:
    """Per modality of ``bundle``, the rows of ``batch`` that hold it: all of them, or (incomplete sets,
    ``present`` [B, M] in the bundle's order, the manifest's) the present ones; modalities no row holds are
    left out."""
    present = batch.get("present")
    if present is None:
        return dict.fromkeys(bundle.modalities, slice(None))
    present = present.cpu()
    return {name: present[:, m] for m, name in enumerate(bundle.modalities) if present[:, m].any()}

