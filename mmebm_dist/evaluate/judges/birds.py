"""The judge of the generated birds: an image attribute classifier and the exact caption reader.

The captions are read back by the rule-based :func:`mmebm_dist.datasets.birds.read_caption_attributes`; images
are read by :class:`AttributeClassifier` (one head per attribute, trained on the real training images; its
test accuracy bounds every image-side figure, report it beside them). ``mmebm eval`` uses :class:`BirdsJudge`
with :func:`read_test_chunks`; the classifier is trained by ``mmebm classifiers train --data DIR``
(:func:`train`) and cached as ``DIR/classifiers/attribute_classifier.pt``. The figures are
:func:`mmebm_dist.evaluate.coherence.measure_coherence`'s, as for every judge.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mmebm_dist.data import shards
from mmebm_dist.data.text import VOCAB_FILE, Vocabulary
from mmebm_dist.datasets.birds import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    IMAGE_MODALITY,
    LABEL_ATTRIBUTE,
    TEXT_MODALITY,
    read_caption_attributes,
)
from mmebm_dist.evaluate.judges.options import TrainOptions

CLASSIFIER_FILE = "attribute_classifier.pt"
SUMMARY_FILE = "attribute_classifier.json"
CLASSIFIER_DIR = "classifiers"
"""Default place of the classifier: DIR/classifiers/, as the digit classifiers of the other data sets."""
DEFAULTS = {"batch_size": 64, "lr": 1e-3, "width": 32, "steps": 1500}
"""``mmebm classifiers train`` settings left unset on the command line."""


def load_split(directory: str | os.PathLike, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """A split (its first ``limit`` samples in manifest order, or all) in memory: images uint8 [N, H, W, 3],
    caption ids [N, L], all captions [N, C, L], attributes int64 [N, len(ATTRIBUTE_NAMES)]."""
    directory = Path(directory)
    manifest = shards.read_manifest(directory)
    specs = {s.name: s for s in shards.modality_specs(manifest)}
    image = specs[IMAGE_MODALITY]
    rows: dict[str, list] = {"images": [], "captions": [], "all_captions": [], "attributes": []}
    for entry in shards.split_shards(manifest, split):
        if limit is not None and len(rows["images"]) >= limit:
            break
        for key, sample in shards.iter_tar_samples(directory / entry["name"]):
            if limit is not None and len(rows["images"]) >= limit:
                break
            missing = {image.entry, f"{TEXT_MODALITY}.npy", "captions.npy", "attrs.npy"} - set(
                sample
            )
            if missing:
                raise shards.ShardError(
                    f"{directory / entry['name']}: sample {key!r} lacks {sorted(missing)}; "
                    "is this a birds data set (`mmebm data birds`)?"
                )
            rows["images"].append(shards.decode_image(image, sample[image.entry]))  # [H, W, 3], png or raw
            rows["captions"].append(shards.decode_entry(specs[TEXT_MODALITY], sample[f"{TEXT_MODALITY}.npy"]))
            rows["all_captions"].append(np.load(_bytes_io(sample["captions.npy"]), allow_pickle=False))
            rows["attributes"].append(np.load(_bytes_io(sample["attrs.npy"]), allow_pickle=False))
    if not rows["images"]:
        raise shards.ShardError(f"{directory}: split '{split}' holds no samples")
    return {k: np.stack(v) for k, v in rows.items()}


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)


class AttributeClassifier(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> logits per attribute, one linear head each.

    Four conv-BN-ReLU blocks (three halve the side), then global max and mean pooling: the bird sits anywhere
    at any of three sizes, so the features are translation-invariant rather than tied to a position.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.test_accuracy: dict[str, float] = {}
        """Test accuracy per attribute (and ``mean``) measured when it was trained; set on load."""
        self.manifest_hash: str | None = None
        """Manifest hash of the data it was trained on; set on load."""
        blocks: list[nn.Module] = []
        channels = (3, width, 2 * width, 4 * width, 4 * width)
        for k, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            if k < 3:
                blocks.append(nn.MaxPool2d(2))
        self.trunk = nn.Sequential(*blocks)
        features = 2 * channels[-1]
        self.heads = nn.ModuleDict(
            {name: nn.Linear(features, len(values)) for name, values in ATTRIBUTES.items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(images)  # (B, C, H/8, W/8)
        pooled = torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Most likely value index per attribute, int64 [N] each (eval mode, batched)."""
        was = self.training
        self.eval()
        out: dict[str, list] = {name: [] for name in ATTRIBUTE_NAMES}
        device = next(self.parameters()).device
        for start in range(0, len(images), batch_size):
            for name, logits in self(images[start : start + batch_size].to(device).float()).items():
                out[name].append(logits.argmax(-1).cpu().numpy())
        self.train(was)
        return {name: np.concatenate(v) for name, v in out.items()}


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 255.0


def train_attribute_classifier(
    directory: str | os.PathLike,
    *,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 1e-3,
    width: int = 32,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[AttributeClassifier, dict[str, float]]:
    """Train on the train split (random horizontal flips); return it and its test accuracy per attribute."""
    from tqdm import tqdm

    train, test = load_split(directory, "train"), load_split(directory, "test")
    torch.manual_seed(seed)
    model = AttributeClassifier(width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    images, attrs = _as_tensor(train["images"]), torch.from_numpy(train["attributes"])
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="attribute classifier", disable=not progress):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = images[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5  # the birds face either way
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
        logits = model(x)
        target = attrs[idx].to(device)
        loss = sum(F.cross_entropy(logits[name], target[:, k]) for k, name in enumerate(ATTRIBUTE_NAMES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    pred = model.predict(_as_tensor(test["images"]))
    report = {
        name: float((pred[name] == test["attributes"][:, k]).mean()) for k, name in enumerate(ATTRIBUTE_NAMES)
    }
    report["mean"] = float(np.mean([report[n] for n in ATTRIBUTE_NAMES]))
    return model, report


def save_classifier(
    model: AttributeClassifier, report: dict[str, float], path: str | os.PathLike, manifest_hash: str
) -> None:
    """Save weights, width, test accuracy and the manifest hash of the data it was trained on."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "width": model.width,
            "accuracy": report,
            "manifest_hash": manifest_hash,
        },
        path,
    )


def load_classifier(path: str | os.PathLike, *, manifest_hash: str | None = None) -> AttributeClassifier:
    """Load a saved classifier; refuse one trained on other data when ``manifest_hash`` is given."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if manifest_hash is not None and blob["manifest_hash"] != manifest_hash:
        raise ValueError(
            f"{path} was trained on data with manifest hash {blob['manifest_hash']}, not "
            f"{manifest_hash}; retrain it (mmebm classifiers train --data DIR)"
        )
    model = AttributeClassifier(blob["width"])
    model.load_state_dict(blob["state_dict"])
    model.test_accuracy = dict(blob["accuracy"])
    model.manifest_hash = blob["manifest_hash"]
    model.eval()
    return model


def classifier_path(directory: str | os.PathLike) -> Path:
    """The classifier file in a classifier directory (``DATA/classifiers`` by default)."""
    return Path(directory) / CLASSIFIER_FILE


def save_summary(path: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """A readable JSON beside the classifier (test accuracy, manifest hash, training settings)."""
    path = Path(path)
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return path


# ------------------------------------------------------------------------------------------------- coherence


def caption_attributes(ids: np.ndarray | torch.Tensor, vocab: Vocabulary) -> dict[str, np.ndarray]:
    """Attributes stated by captions given as ids [N, L] (UNMENTIONED where a caption says nothing)."""
    read = [read_caption_attributes(text) for text in vocab.decode_batch(np.asarray(ids))]
    return {name: np.array([r[name] for r in read], dtype=np.int64) for name in ATTRIBUTE_NAMES}


class BirdsJudge:
    """Attribute readings (``mmebm_dist.evaluate.judges.Judge``): the exact reader for captions, the trained
    classifier for images; a test tuple's image fixes its true attributes, its caption what the caption
    states. Values are indices into ATTRIBUTES; UNMENTIONED (-1) where a caption says nothing."""

    attributes = ATTRIBUTE_NAMES
    classifiers = None
    """No per-modality class predictors: the Frechet distance in their features and refinement are skipped."""

    def __init__(self, classifier: AttributeClassifier, vocab: Vocabulary, *, path: str | os.PathLike = ""):
        self.classifier = classifier
        self.vocab = vocab
        self.path = str(path)

    @property
    def test_accuracy(self) -> dict[str, float]:
        """The image classifier's test accuracy per attribute (it bounds every image-side figure)."""
        return self.classifier.test_accuracy

    @property
    def manifest_hash(self) -> str | None:
        return self.classifier.manifest_hash

    def read(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == IMAGE_MODALITY:
            values = self.classifier.predict(x.detach().float())
        elif name == TEXT_MODALITY:
            values = caption_attributes(x.detach().cpu(), self.vocab)
        else:
            raise KeyError(
                f"modality '{name}' is not a birds modality ({IMAGE_MODALITY!r}, {TEXT_MODALITY!r}); "
                "evaluate birds runs with the modality names of configs/birds_*.yaml"
            )
        return torch.from_numpy(np.stack([values[a] for a in ATTRIBUTE_NAMES], axis=1)).long()

    def known(self, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if name == IMAGE_MODALITY:
            return batch["attributes"].long().cpu()
        return self.read(name, batch[name])

    def describe(self) -> dict:
        return {"dir": str(Path(self.path).parent), "manifest_hash": self.manifest_hash, "file": self.path,
                "test_accuracy": self.test_accuracy,
                "note": "Images are read by the attribute classifier (its test accuracy per attribute "
                        "below); captions by the exact rule-based reader "
                        "(mmebm_dist.datasets.birds.read_caption_attributes)."}


def load_judge(
    classifier_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    manifest_hash: str | None,
    modalities: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> BirdsJudge:
    """The judge of a birds data set: its vocabulary and the attribute classifier cached in ``classifier_dir``
    (refused when trained on other data, or when ``modalities`` are not the birds' image and caption)."""
    unknown = sorted(set(modalities or ()) - {IMAGE_MODALITY, TEXT_MODALITY})
    if unknown:
        raise KeyError(
            f"modalities {unknown} are not birds modalities ({IMAGE_MODALITY!r}, {TEXT_MODALITY!r}); "
            "evaluate birds runs with the modality names of configs/birds_*.yaml"
        )
    path = classifier_path(classifier_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"no attribute classifier at '{path}'; train it with: mmebm classifiers train --data {data_dir}"
            f" --out {classifier_dir}"
        )
    classifier = load_classifier(path, manifest_hash=manifest_hash).to(device)
    return BirdsJudge(classifier, Vocabulary.load(Path(data_dir) / VOCAB_FILE), path=path)


def read_test_chunks(
    directory: str | os.PathLike,
    *,
    num: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, torch.Tensor] | None]:
    """The first ``num`` test samples (manifest order, as ``evaluate.generate.read_chunks``) as model batches
    plus ``attributes`` int64 [B, A], cut into chunks of ``batch_size``; chunks another rank handles
    (i % world_size != rank) are None."""
    if num <= 0 or batch_size <= 0:
        raise ValueError(f"number of samples ({num}) and batch size ({batch_size}) must be positive")
    data = load_split(directory, "test", limit=num)
    label = ATTRIBUTE_NAMES.index(LABEL_ATTRIBUTE)
    chunks: list[dict[str, torch.Tensor] | None] = []
    for k, start in enumerate(range(0, len(data["images"]), batch_size)):
        if k % world_size != rank:
            chunks.append(None)
            continue
        sl = slice(start, start + batch_size)
        attrs = torch.from_numpy(data["attributes"][sl])
        chunks.append(
            {
                IMAGE_MODALITY: _as_tensor(data["images"][sl]),
                TEXT_MODALITY: torch.from_numpy(data["captions"][sl]),
                "label": attrs[:, label].clone(),
                "attributes": attrs,
            }
        )
    return chunks


def train(options: TrainOptions) -> int:
    """``mmebm classifiers train`` on a birds data set: the image attribute classifier, cached as
    OUT/attribute_classifier.pt (captions are read exactly, so they need none)."""
    from mmebm_dist.evaluate.generate import resolve_device

    start = time.perf_counter()
    data = Path(options.data)
    Vocabulary.load(data / VOCAB_FILE)  # fail early on a damaged data set
    out = Path(options.out) if options.out else data / CLASSIFIER_DIR
    settings = {name: DEFAULTS[name] if getattr(options, name) is None else getattr(options, name)
                for name in ("steps", "batch_size", "lr", "width")}
    model, accuracy = train_attribute_classifier(
        data, steps=int(settings["steps"]), batch_size=int(settings["batch_size"]), lr=float(settings["lr"]),
        width=int(settings["width"]), seed=options.seed, device=resolve_device(options.device))
    data_hash = shards.manifest_hash(data)
    out.mkdir(parents=True, exist_ok=True)
    path = classifier_path(out)
    save_classifier(model.cpu(), accuracy, path, data_hash)
    seconds = time.perf_counter() - start
    save_summary(out / SUMMARY_FILE, {"data_path": str(data), "manifest_hash": data_hash,
                                      "test_accuracy": accuracy, "seed": options.seed, "seconds": seconds,
                                      **settings})
    print(f"attribute classifier for birds data {data} (manifest hash {data_hash[:12]}...), "
          f"{settings['steps']} steps, {seconds:.0f} s; captions are read exactly (no classifier):")
    for name, acc in accuracy.items():
        print(f"  {name}: test accuracy {acc:.4f}")
    print(f"saved to {path}")
    return 0
