"""Fixtures of the importer tests: tiny data in each source layout, and a 5-step training run of an import."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tests.train_helpers import build_tiny_polymnist, write_idx

CUB_WORDS = ("red", "blue", "small", "large", "bird", "wings", "beak", "tail")


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def polymnist_folders(root: Path, *, train: int = 24, test: int = 8, modalities: int = 2) -> Path:
    """``mmebm data polymnist --format folders`` output built from tiny IDX files."""
    return build_tiny_polymnist(root, modalities=modalities, train=train, test=test, shard_size=10,
                                layout="folders")


def svhn_mat(path: Path, labels: np.ndarray, seed: int) -> Path:
    """A torchvision-layout SVHN .mat: X uint8 [32, 32, 3, N], y [N, 1] in 1..10 (10 is the digit 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, len(labels)), dtype=np.uint8)
    y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
    savemat(path, {"X": x, "y": y})
    return path


def mnist_svhn_source(root: Path) -> Path:
    """MNIST IDX (40 train / 20 test, labels i % 10) and SVHN .mat files (skewed classes) in one folder."""
    src = write_idx(root / "ms", train=40, test=20)
    svhn_mat(src / "train_32x32.mat", np.array([d for d in range(10) for _ in range(1 + d % 3)]), 1)
    svhn_mat(src / "test_32x32.mat", np.arange(10), 2)
    return src


def cub_source(root: Path) -> tuple[Path, dict[str, list[str]]]:
    """CUB layout: two train classes (a grey image, sizes differ), one test class; 10 captions per image."""
    src = root / "cub"
    rng = np.random.default_rng(0)
    files = {
        "train": [
            ("001.Albatross", "a.jpg", (40, 50, 3)),
            ("001.Albatross", "b.png", (30, 30, 3)),
            ("002.Bunting", "c.jpg", (64, 48)),
        ],
        "test": [("003.Cardinal", "d.png", (20, 20, 3))],
    }
    captions: dict[str, list[str]] = {}
    for split, items in files.items():
        for folder, name, shape in items:
            write_png(src / split / folder / name, rng.integers(0, 256, size=shape, dtype=np.uint8))
        captions[split] = [
            " ".join(rng.choice(CUB_WORDS, size=5 + k % 4)) + "." for k in range(10 * len(items))
        ]
    (src / "text_trainvalclasses.txt").write_text("\n".join(captions["train"]) + "\n")
    (src / "text_testclasses.txt").write_text("\n".join(captions["test"]) + "\n")
    return src, captions


def table_source(root: Path, *, rows: int = 30, fmt: str = "jsonl") -> Path:
    """A table of (image path, .npy signal path, inline text, label, key, split) rows, paths relative."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    (root / "sig").mkdir(exist_ok=True)
    for i in range(rows):
        write_png(root / "img" / f"{i}.png", rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8))
        np.save(root / "sig" / f"{i}.npy", rng.normal(size=16))  # float64: stored as float32
        records.append(
            {
                "key": f"r{i}",
                "photo": f"img/{i}.png",
                "signal": f"sig/{i}.npy",
                "note": f"sample {'odd' if i % 2 else 'even'} number",
                "label": i % 3,
                "split": "test" if i % 5 == 0 else "train",
            }
        )
    path = root / f"table.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        buf = io.StringIO()
        buf.write(",".join(records[0]) + "\n")
        for r in records:
            buf.write(",".join(str(v) for v in r.values()) + "\n")
        path.write_text(buf.getvalue())
    return path


def webdataset_source(root: Path) -> Path:
    """Shards written by webdataset's TarWriter: image.png (uint8 array), vec.npy (float32), cls."""
    import webdataset as wds

    rng = np.random.default_rng(5)
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, count in (("train-000.tar", 10), ("train-001.tar", 8), ("test-000.tar", 6)):
        with wds.TarWriter(str(root / name)) as sink:
            for _ in range(count):
                sink.write(
                    {
                        "__key__": f"s{n:05d}",
                        "image.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                        "vec.npy": rng.normal(size=5).astype(np.float32),
                        "cls": n % 4,
                    }
                )
                n += 1
    return root


def tiny_train(data: Path, run_dir: Path, *, steps: int = 5) -> dict:
    """Train the starter config of ``data``, shrunk to a tiny model, for ``steps`` steps in this process."""
    from accelerate.state import AcceleratorState

    from mmebm_dist.config import config_from_dict
    from mmebm_dist.datasets.starter import starter_config
    from mmebm_dist.train.loop import train

    cfg = yaml.safe_load(starter_config(data, steps=steps))
    cfg["model"].update(latent_dim=4, private_dim=2, width=4)
    cfg["model"]["prior"].update(
        hidden=16, layers=1, langevin={"steps": 2, "step_size": 0.1, "backend": "autograd"}
    )
    cfg["data"].update(batch_size=4, num_workers=0, shuffle_buffer=8)
    cfg["train"].update(out_dir=str(run_dir), threads=1, log_every=1)
    AcceleratorState._reset_state(True)
    try:
        summary = train(config_from_dict(cfg))
    finally:
        AcceleratorState._reset_state(True)
    assert summary["step"] == steps
    assert all(math.isfinite(v) for v in summary["terms"].values()), summary["terms"]
    return summary
