"""The real MNIST-SVHN: SVHN's torchvision ``.mat`` files and MNIST IDX files, paired per class as MMVAE does.

MMVAE (iffsid/mmvae, bin/make-mnist-svhn-idx.py, ``rand_match_on_idx``): per digit c, n = min(#MNIST of c,
#SVHN of c, max_d = 10,000); the first n images of c in each set, then ``dm`` = 30 random permutations of both
lists appended; SVHN's label 10 means digit 0 (``labels % 10``). This importer calls the same procedure
(:func:`mmebm_dist.datasets.mnist_svhn.pair_by_class`, ``--factor`` = dm, ``--max-per-class`` = max_d) with
two differences: "the first n of class c" is in file order (MMVAE takes them in the order of a non-stable
``torch.sort``, so which n it keeps when n < the class count is not defined), and the permutations come
from numpy seeded by ``--seed`` rather than torch's global generator; the pairs are then shuffled once so
shards mix classes (MMVAE's DataLoader shuffles every epoch instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmebm_dist.data.sources import DIGIT_CLASSES, SourceError, load_idx_dir
from mmebm_dist.datasets.importers.common import (
    ImportDataError,
    image_modality,
    png_entry,
    staging_dir,
    write_import,
)

SPLITS = ("train", "test")
MAT_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
MMVAE_FACTOR = 30
MMVAE_MAX_PER_CLASS = 10000


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 32, 32, 3], int64 digits [N]) of a torchvision SVHN ``.mat`` (X: [32, 32, 3, N],
    y: [N, 1] with 10 for the digit 0). Needs scipy (a dependency of scikit-image)."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # scipy comes with scikit-image; a stripped environment may lack it
        raise ImportDataError(f"{path}: reading .mat files needs scipy: pip install scipy") from exc
    if not path.is_file():
        raise ImportDataError(
            f"{path}: file does not exist; mnist-svhn needs SVHN's {MAT_FILES['train']} and "
            f"{MAT_FILES['test']} (the cropped-digits format) in SRC"
        )
    try:
        mat = loadmat(path)
    except (ValueError, OSError, TypeError, NotImplementedError) as exc:
        raise ImportDataError(f"{path}: not a readable .mat file ({exc})") from exc
    for key in ("X", "y"):
        if key not in mat:
            raise ImportDataError(
                f"{path}: no variable {key!r} (has {sorted(k for k in mat if not k.startswith('__'))})"
            )
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise ImportDataError(f"{path}: X is {x.dtype} {list(x.shape)}, expected uint8 [32, 32, 3, N]")
    if len(y) != x.shape[3]:
        raise ImportDataError(f"{path}: {x.shape[3]} images but {len(y)} labels")
    if not np.all(np.isin(y, np.arange(1, 11))):
        bad = int(np.flatnonzero(~np.isin(y, np.arange(1, 11)))[0])
        raise ImportDataError(
            f"{path}: label y[{bad}] = {y[bad]!r}, SVHN labels are 1..10 (10 is the digit 0)"
        )
    return np.ascontiguousarray(np.moveaxis(x, 3, 0)), (y.astype(np.int64) % 10)


def _sample(st: dict[str, Any], split: str, i: int) -> tuple[list[tuple[str, bytes]], int]:
    a, b = st["pairs"][split][i]
    images, labels = st["mnist"][split]
    return [png_entry("mnist", images[a]), png_entry("svhn", st["svhn"][split][0][b])], int(labels[a])


def import_mnist_svhn(
    src: str | Path,
    out: str | Path,
    *,
    mnist_dir: str | Path | None = None,
    factor: int = MMVAE_FACTOR,
    max_per_class: int = MMVAE_MAX_PER_CLASS,
    seed: int = 0,
    shard_size: int = 1000,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pair SVHN (``src``/*_32x32.mat) with MNIST (IDX files in ``mnist_dir``, default ``src``); the manifest.

    Side files ``pairs-{split}.npy``: int64 [N, 2] (MNIST index, SVHN index) of each tuple in shard order.
    """
    from mmebm_dist.datasets.mnist_svhn import pair_by_class

    src = Path(src)
    try:
        mnist = load_idx_dir(mnist_dir or src, name="idx", class_names=DIGIT_CLASSES)
    except SourceError as exc:
        raise ImportDataError(f"{exc} (pass --mnist-dir DIR holding MNIST's IDX files)") from exc
    svhn = {split: read_svhn_mat(src / MAT_FILES[split]) for split in SPLITS}
    pairs = {}
    for k, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, k, 2])
        try:
            ia, ib = pair_by_class(
                mnist.split(split)[1], svhn[split][1], max_per_class=max_per_class, factor=factor, rng=rng
            )
        except ValueError as exc:
            raise ImportDataError(f"{src}: {split}: {exc}") from exc
        order = rng.permutation(len(ia))
        pairs[split] = np.stack([ia[order], ib[order]], axis=1).astype(np.int64)
    counts = {split: len(pairs[split]) for split in SPLITS}
    with staging_dir(Path(out), overwrite) as stage:
        for split in SPLITS:
            np.save(stage / f"pairs-{split}.npy", pairs[split])
        return write_import(
            stage,
            _sample,
            counts,
            state={"pairs": pairs, "mnist": {s: mnist.split(s) for s in SPLITS}, "svhn": svhn},
            modalities=[
                image_modality("mnist", (28, 28, 1), mnist.origin),
                image_modality("svhn", (32, 32, 3), str(src)),
            ],
            class_names=list(DIGIT_CLASSES),
            source={
                "name": "mnist-svhn",
                "origin": f"MNIST IDX in {mnist.origin}; SVHN .mat in {src}",
                "path": str(src),
                **counts,
                "images": {s: {"mnist": len(mnist.split(s)[1]), "svhn": len(svhn[s][1])} for s in SPLITS},
            },
            builder={
                "command": "import mnist-svhn",
                "factor": factor,
                "max_per_class": max_per_class,
                "seed": seed,
                "shard_size": shard_size,
                "pairing": "MMVAE rand_match_on_idx",
                "pairs_per_class": {
                    s: np.bincount(mnist.split(s)[1][pairs[s][:, 0]], minlength=10).tolist() for s in SPLITS
                },
            },
            shard_size=shard_size,
            workers=workers,
            progress=progress,
        )
