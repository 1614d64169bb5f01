"""Helpers of the data tests: tiny MNIST-format IDX files and tiny PolyMNIST-style data sets from them."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

IMAGE_MAGIC, LABEL_MAGIC = 0x803, 0x801


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: magic, big-endian dims, then the uint8 data."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(directory: Path, *, train: int = 60, test: int = 20, seed: int = 0, gz: bool = False,
              dotted: bool = False) -> Path:
    """Tiny IDX files of random 'digits' (pixels > 128 form the stroke) with labels cycling 0..9.

    ``dotted`` uses the ``train-images.idx3-ubyte`` name variant; ``gz`` gzips every file.
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    sep = "." if dotted else "-"
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array, magic in (("images", images, IMAGE_MAGIC), ("labels", labels, LABEL_MAGIC)):
            dim = 3 if kind == "images" else 1
            name = f"{prefix}-{kind}{sep}idx{dim}-ubyte" + (".gz" if gz else "")
            data = idx_bytes(array, magic)
            (directory / name).write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return directory


def build_tiny(root: Path, *, modalities: int = 3, train: int = 40, test: int = 12, shard_size: int = 8,
               seed: int = 0, workers: int = 1, fmt: str = "shards", out_name: str = "data") -> Path:
    """A tiny PolyMNIST-style data set built by the real builder from tiny IDX files."""
    from mmebm_dist.datasets.polymnist import BuildSpec, build_polymnist

    idx = root / "idx"
    if not idx.exists():
        write_idx(idx)
    out = root / out_name
    build_polymnist(BuildSpec(source="idx", idx_dir=str(idx), modalities=modalities, out=str(out),
                              num_samples=train, test_samples=test, shard_size=shard_size, seed=seed,
                              workers=workers, format=fmt), progress=False)
    return out


def restamp(directory: Path, name: str) -> None:
    """Record a rewritten shard's size and sha256 in the manifest (so only its content is wrong)."""
    from mmebm_dist.data import shards

    manifest = json.loads((directory / shards.MANIFEST).read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry["bytes"] = (directory / name).stat().st_size
            entry["sha256"] = shards.sha256_file(directory / name)
    shards.write_manifest(directory, manifest)


def sample_ids(batch: dict[str, torch.Tensor]) -> list[str]:
    """One identity per sample of a batch: a hash of all its modality tensors and its label."""
    names = sorted(k for k in batch if k != "label")
    out = []
    for i in range(len(batch["label"])):
        h = hashlib.sha1(str(int(batch["label"][i])).encode())
        for name in names:
            h.update(batch[name][i].numpy().tobytes())
        out.append(h.hexdigest())
    return out
