"""PolyMNIST-style builder: M views of one class, each a different image on its own photo background.

As in PolyMNIST (Sutter et al.), tuple i takes the label of source image i; modality m shows another image of
that class (an independent per-class shuffle for each modality and pass over the source), binarised at > 128
and composited on a random 28x28 crop of the modality's own colour photo with the colours inverted under the
stroke. Each shard depends only on (seed, split, shard index), so any worker count writes the same bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmebm_dist.data import shards
from mmebm_dist.data.codec import encode_png
from mmebm_dist.data.sources import IMAGE_SIZE, SourceData, load_source
from mmebm_dist.datasets import generated
from mmebm_dist.datasets.generated import BACKGROUNDS as BACKGROUNDS  # re-exported: PolyMNIST's backgrounds
from mmebm_dist.datasets.generated import SPLIT_IDS, load_backgrounds

BINARISE_THRESHOLD = 128
FORMATS = ("shards", "folders")


@dataclass(kw_only=True)
class BuildSpec:
    """Everything that determines a PolyMNIST-style dataset (plus where and how fast to write it)."""

    source: str = "mnist"
    """Source name for ``load_source``: mnist, idx or fashion."""
    modalities: int = 5
    """M, the number of modalities (views) per tuple."""
    out: str = "data/polymnist"
    """Output directory."""
    num_samples: int | None = None
    """Train tuples (default: the source's train size); may exceed it (more passes, new crops)."""
    test_samples: int | None = None
    """Test tuples (default: the source's test size)."""
    shard_size: int = 500
    """Samples per shard (the last shard of a split may hold fewer)."""
    seed: int = 0
    """Seed of the image shuffles and crops."""
    workers: int = 0
    """Worker processes (0: os.cpu_count()); does not change the output."""
    format: str = "shards"
    """``shards`` (webdataset tars) or ``folders`` (PolyMNIST layout {split}/m{k}/{i}.{label}.png)."""
    idx_dir: str | None = None
    """IDX directory for source ``idx`` (or ``fashion`` outside the Debian path)."""
    cache_dir: str | None = None
    """Cache directory for the mnist source (default $MMEBM_CACHE or ~/.cache/mmebm_dist)."""
    encoding: str = "png"
    """Image storage in shards: ``png`` or ``raw`` (uint8 bytes: bigger on disk, far faster to load)."""
    overwrite: bool = False
    """Replace a dataset already in ``out`` (only files this builder writes are removed)."""
    drop_rate: float = 0.0
    """Probability that a tuple lacks each modality (independently; never all of them: see drop_mask)."""


def modality_names(count: int) -> list[str]:
    """Names of the modalities: m0, m1, ... (the original PolyMNIST folder names)."""
    return [f"m{k}" for k in range(count)]


def assign_images(
    labels: np.ndarray, num_tuples: int, num_modalities: int, *, seed: int, split: str
) -> np.ndarray:
    """Source image index per (modality, tuple), int64 [M, N].

    Tuple i has the label of source image i mod n; for each modality and pass r = i // n, the images of each
    class are an independent random permutation of that class's images, so each view is another instance.
    """
    n = len(labels)
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    passes = -(-num_tuples // n)
    out = np.empty((num_modalities, passes * n), dtype=np.int64)
    for m in range(num_modalities):
        for r in range(passes):
            rng = np.random.default_rng([seed, SPLIT_IDS[split], m, r])
            mapped = np.empty(n, dtype=np.int64)
            for idx in members:
                mapped[idx] = idx[rng.permutation(len(idx))]
            out[m, r * n : (r + 1) * n] = mapped
    return out[:, :num_tuples]


def drop_mask(num_tuples: int, num_modalities: int, rate: float, *, seed: int, split: str) -> np.ndarray:
    """bool [N, M]: which modalities each tuple keeps. Each is dropped independently with probability
    ``rate``; a tuple that would lose all of them keeps one, chosen uniformly. Seeded by (seed, split) on a
    stream of its own, so the images are those of the complete set."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], 104729])
    present = rng.random((num_tuples, num_modalities)) >= rate
    keep = rng.integers(0, num_modalities, size=num_tuples)
    empty = ~present.any(1)
    present[empty, keep[empty]] = True
    return present


def composite(digits: np.ndarray, background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, 28, 28, 3]: digits binarised at > 128 on random crops, colours inverted under the stroke."""
    n = len(digits)
    h, w = background.shape[:2]
    ys = rng.integers(0, h - IMAGE_SIZE + 1, size=n)
    xs = rng.integers(0, w - IMAGE_SIZE + 1, size=n)
    ar = np.arange(IMAGE_SIZE)
    crops = background[
        ys[:, None, None] + ar[None, :, None], xs[:, None, None] + ar[None, None, :]
    ]  # (n, 28, 28, 3)
    stroke = (digits > BINARISE_THRESHOLD)[..., None]
    return np.where(stroke, 255 - crops, crops).astype(np.uint8)


def _build_shard(job: tuple[str, int, int, int]) -> dict[str, Any]:
    """Render tuples [start, end) of ``split`` and write them as one shard (or as PolyMNIST folder files)."""
    split, index, start, end = job
    st = generated.worker_state()
    images, labels = st["splits"][split]
    assignment = st["assignment"][split]
    names = st["names"]
    tuple_labels = labels[np.arange(start, end) % len(labels)]
    rng = np.random.default_rng([st["seed"], SPLIT_IDS[split], index, 7919])
    views = [
        composite(images[assignment[m, start:end]], bg, rng) for m, (_, bg) in enumerate(st["backgrounds"])
    ]
    out = Path(st["out"])
    present = st["present"][split][start:end] if st["present"] is not None else None  # (n, M) bool
    if st["format"] == "folders":
        for m, name in enumerate(names):
            folder = out / split / name
            for j in range(end - start):
                if present is None or present[j, m]:
                    path = folder / f"{start + j}.{int(tuple_labels[j])}.png"
                    path.write_bytes(encode_png(views[m][j]))
        return {"split": split, "index": index, "count": end - start}
    samples, complete = [], []
    for j in range(end - start):
        images = {name: views[m][j] for m, name in enumerate(names)}
        label = (shards.LABEL_EXT, str(int(tuple_labels[j])).encode())
        entries = shards.image_entries(images, st["encoding"])
        if present is not None:  # keep the complete twin's sample, for its manifest hash
            complete.append((f"{start + j:08d}", [*entries, label]))
            entries = (shards.image_entries(images, "raw", present[j]) if st["encoding"] == "raw"
                       else [e for e, kept in zip(entries, present[j], strict=True) if kept])  # PNG: once
        samples.append((f"{start + j:08d}", [*entries, label]))
    entry = generated.write_shard(out, split, index, samples)
    if present is not None:
        size, digest = shards.tar_digest(
            (f"{key}.{ext}", data) for key, entries in complete for ext, data in entries
        )
        entry["complete"] = {"bytes": size, "sha256": digest}
    return entry


def build_polymnist(spec: BuildSpec, *, progress: bool = True) -> dict[str, Any]:
    """Build the dataset described by ``spec`` and return its manifest (also written to out/manifest.json)."""
    if spec.format not in FORMATS:
        raise ValueError(f"--format {spec.format!r}: choose one of {', '.join(FORMATS)}")
    if spec.encoding not in shards.IMAGE_ENCODINGS or (spec.encoding != "png" and spec.format == "folders"):
        raise ValueError(
            f"--encoding {spec.encoding!r} with --format {spec.format}: choose one of "
            f"{', '.join(shards.IMAGE_ENCODINGS)} (folders hold PNG files only)"
        )
    if not 0.0 <= spec.drop_rate < 1.0:
        raise ValueError(f"--drop-rate {spec.drop_rate}: must be in [0, 1)")
    if spec.modalities < 1 or spec.shard_size < 1:
        raise ValueError(
            f"--modalities ({spec.modalities}) and --shard-size ({spec.shard_size}) must be >= 1"
        )
    source = load_source(spec.source, idx_dir=spec.idx_dir, cache_dir=spec.cache_dir)
    backgrounds = load_backgrounds(spec.modalities)
    names = modality_names(spec.modalities)
    counts = {
        "train": spec.num_samples if spec.num_samples is not None else len(source.train_labels),
        "test": spec.test_samples if spec.test_samples is not None else len(source.test_labels),
    }
    for split, n in counts.items():
        if n < 1:
            raise ValueError(f"{split} sample count must be >= 1, got {n}")
    out = Path(spec.out)
    folder_pngs = [f"{split}/m*/[0-9]*.[0-9]*.png" for split in shards.SPLITS]  # the folders layout's images
    with generated.staged_output(out, spec.overwrite, nested=folder_pngs) as out:  # swapped in complete

        state = {
            "splits": {split: source.split(split) for split in shards.SPLITS},
            "assignment": {
                split: assign_images(
                    source.split(split)[1], counts[split], spec.modalities, seed=spec.seed, split=split
                )
                for split in shards.SPLITS
            },
            "present": {
                split: drop_mask(counts[split], spec.modalities, spec.drop_rate, seed=spec.seed, split=split)
                for split in shards.SPLITS
            } if spec.drop_rate > 0 else None,
            "backgrounds": backgrounds,
            "names": names,
            "seed": spec.seed,
            "out": str(out),
            "format": spec.format,
            "encoding": spec.encoding,
        }
        if spec.format == "folders":
            for split in shards.SPLITS:
                for name in names:
                    (out / split / name).mkdir(parents=True, exist_ok=True)
        results = generated.write_shards(
            _build_shard,
            counts,
            spec.shard_size,
            state=state,
            workers=spec.workers,
            desc=f"polymnist {spec.format}",
            unit="tuple",
            progress=progress,
        )
        manifest = _manifest(spec, source, backgrounds, names, counts, results)
        if state["present"] is not None:
            manifest = _incomplete_manifest(manifest, spec, source, backgrounds, names, counts, results,
                                            state["present"])
        shards.write_manifest(out, manifest)
        return manifest


def _incomplete_manifest(
    manifest: dict[str, Any],
    spec: BuildSpec,
    source: SourceData,
    backgrounds: list[tuple[str, np.ndarray]],
    names: list[str],
    counts: dict[str, int],
    results: list[dict[str, Any]],
    present: dict[str, np.ndarray],
) -> dict[str, Any]:
    """``manifest`` marked incomplete, with its drop rate, per-split presence counts and the manifest hash
    of its complete twin (the same build at drop rate 0: classifiers trained on that judge this one too)."""
    twin_results = [{**r, **r.get("complete", {})} for r in results]
    twin = _manifest(replace(spec, drop_rate=0.0), source, backgrounds, names, counts, twin_results)
    specs = shards.modality_specs(manifest)
    return {
        **manifest,
        "incomplete": True,
        "presence": {
            "drop_rate": spec.drop_rate,
            **shards.presence_summary(specs, present),
            "complete_manifest_hash": shards.manifest_dict_hash(twin),
        },
    }


def _manifest(
    spec: BuildSpec,
    source: SourceData,
    backgrounds: list[tuple[str, np.ndarray]],
    names: list[str],
    counts: dict[str, int],
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    builder = {k: v for k, v in asdict(spec).items() if k not in ("out", "workers", "overwrite", "cache_dir")}
    if not spec.drop_rate:  # complete sets keep the manifest (and hash) they had before drop_rate existed
        del builder["drop_rate"]
    modalities = [
        {"name": name, "shape": [3, IMAGE_SIZE, IMAGE_SIZE], "dtype": "uint8", "encoding": spec.encoding,
         "background": bg}
        for name, (bg, _) in zip(names, backgrounds, strict=True)
    ]
    source_info = {
        "name": source.name,
        "origin": source.origin,
        "train": int(len(source.train_labels)),
        "test": int(len(source.test_labels)),
    }
    return generated.manifest_base(
        modalities=modalities,
        class_names=source.class_names,
        counts=counts,
        entries=results,
        source=source_info,
        seed=spec.seed,
        builder={"command": "polymnist", **builder},
        layout=spec.format,
    )
