"""MNIST + generated street numbers: rendering, contrast check, MMVAE pairing, shards, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import write_idx

from mmebm_dist.data import shards, stream
from mmebm_dist.datasets import generated, mnist_svhn
from mmebm_dist.datasets.mnist_svhn import (
    HouseNumberParams,
    MnistSvhnSpec,
    build_mnist_svhn,
    class_counts,
    glyph_contrast,
    pair_by_class,
    render_house_number,
)


@pytest.fixture(scope="module")
def photos():
    return generated.load_photos()


@pytest.fixture(scope="module")
def fonts():
    return mnist_svhn.digit_fonts()


def test_bundled_fonts_are_all_found_and_draw_digits(fonts):
    assert [f.name for f in fonts] == list(mnist_svhn.MATPLOTLIB_DIGIT_FONTS)


@pytest.mark.parametrize("name", ["LastResortHE-Regular.ttf", "DejaVuSansDisplay.ttf"])
def test_font_without_digits_is_refused(name):
    with pytest.raises(ValueError, match="ten distinct digits"):
        mnist_svhn.check_digit_font(mnist_svhn.matplotlib_font_dir() / name)


def test_missing_font_is_named():
    with pytest.raises(FileNotFoundError, match="no-such.ttf"):
        mnist_svhn.digit_fonts(["/nowhere/no-such.ttf"])


def test_render_is_deterministic_per_seed(photos, fonts):
    a = render_house_number(3, np.random.default_rng([0, 5]), photos, fonts)
    b = render_house_number(3, np.random.default_rng([0, 5]), photos, fonts)
    c = render_house_number(3, np.random.default_rng([0, 6]), photos, fonts)
    assert a.image.tobytes() == b.image.tobytes() and a.digits == b.digits
    assert a.image.tobytes() != c.image.tobytes()


def test_every_image_is_legible_centred_on_its_label_and_inside_the_frame(photos, fonts):
    p = HouseNumberParams()
    for i in range(60):
        label = i % 10
        hn = render_house_number(label, np.random.default_rng([1, i]), photos, fonts, p)
        assert hn.image.shape == (32, 32, 3) and hn.image.dtype == np.uint8
        assert hn.digits[1] == str(label) and len(hn.digits) == 3
        # the contrast check, recomputed on the final uint8 image, holds for every glyph
        assert glyph_contrast(hn.image, hn.alpha) >= p.min_contrast
        assert hn.contrast == pytest.approx(glyph_contrast(hn.image, hn.alpha))
        # no ink on the 1-pixel border: glyphs are kept inside the frame
        border = np.ones((32, 32), bool)
        border[1:-1, 1:-1] = False
        assert hn.alpha[:, border].max() < 0.02
        # the middle glyph (the label) is the one nearest the centre
        cols = [np.average(np.arange(32), weights=g.sum(0)) for g in hn.alpha]
        assert abs(cols[1] - 15.5) < min(abs(cols[0] - 15.5), abs(cols[2] - 15.5))


def test_contrast_measure_and_rejection():
    alpha = np.zeros((1, 16, 16), np.float32)
    alpha[0, 5:11, 5:11] = 1.0
    grey = np.full((16, 16, 3), 128, np.uint8)
    assert glyph_contrast(grey, alpha) == 0.0  # glyph as bright as its background: illegible
    text = grey.copy()
    text[5:11, 5:11] = 255
    assert glyph_contrast(text, alpha) == pytest.approx(127 / 255, abs=1e-3)


def test_impossible_contrast_raises_naming_the_threshold(photos, fonts):
    with pytest.raises(RuntimeError, match="min_contrast"):
        render_house_number(
            1, np.random.default_rng(0), photos, fonts, HouseNumberParams(min_contrast=1.01, max_attempts=3)
        )


def test_class_counts_follow_svhn():
    assert class_counts(73257, mnist_svhn.SVHN_CLASS_COUNTS["train"]) == list(
        mnist_svhn.SVHN_CLASS_COUNTS["train"]
    )
    small = class_counts(1000, mnist_svhn.SVHN_CLASS_COUNTS["test"])
    assert sum(small) == 1000 and small[1] == max(small)  # SVHN's most frequent class is 1


def test_pairing_counts_per_class_as_mmvae():
    labels_a = np.repeat(np.arange(10), [5, 7, 3, 9, 9, 9, 9, 9, 9, 9])
    labels_b = np.repeat(np.arange(10), [6, 4, 8, 2, 9, 9, 9, 9, 9, 12])
    rng = np.random.default_rng(0)
    ia, ib = pair_by_class(labels_a, labels_b, max_per_class=8, factor=3, rng=rng)
    expected = [min(a, b, 8) for a, b in zip(np.bincount(labels_a), np.bincount(labels_b), strict=True)]
    assert np.bincount(labels_a[ia], minlength=10).tolist() == [3 * n for n in expected]
    assert (labels_a[ia] == labels_b[ib]).all()
    # each repeat is a permutation of the same first-n images of the class
    c9 = np.flatnonzero(labels_b == 9)[:8]
    assert set(ib[labels_b[ib] == 9].tolist()) == set(c9.tolist())
    with pytest.raises(ValueError, match="--factor"):
        pair_by_class(labels_a, labels_b, max_per_class=8, factor=0, rng=rng)


def _build(root, name, workers, encoding="png"):
    idx = root / "idx"
    if not idx.exists():
        write_idx(idx, train=60, test=20)
    out = root / name
    spec = MnistSvhnSpec(
        out=str(out),
        source="idx",
        idx_dir=str(idx),
        num_train=40,
        num_test=20,
        factor=2,
        shard_size=16,
        workers=workers,
        seed=3,
        encoding=encoding,
    )
    return out, build_mnist_svhn(spec, progress=False)


@pytest.mark.slow
def test_build_is_deterministic_verifies_and_loads(tmp_path):
    out, manifest = _build(tmp_path, "a", workers=1)
    again, _ = _build(tmp_path, "b", workers=2)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:  # same seed, any worker count: the same bytes
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    total = sum(info["count"] for info in manifest["splits"].values())
    assert shards.verify(out, progress=False) == {"shards": len(manifest["shards"]), "samples": total}
    # pairs per class: factor * min(MNIST count, street-number count, max_per_class)
    street = np.load(out / "svhn-train.npz")
    mnist_counts = np.bincount(np.arange(60) % 10, minlength=10)
    expected = 2 * np.minimum(mnist_counts, np.bincount(street["labels"], minlength=10))
    assert manifest["builder"]["pairs_per_class"]["train"] == expected.tolist()
    # every pair shares its class: the street number's middle digit is the MNIST label
    pairs = np.load(out / "pairs-train.npy")
    middle = np.array([int(d[1]) for d in street["digits"]])
    assert (middle[pairs[:, 1]] == pairs[:, 0] % 10).all()
    assert (street["contrast"] >= HouseNumberParams().min_contrast).all()
    loader = stream.make_loader(out, batch_size=8, num_workers=0, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["mnist"].shape == (8, 1, 28, 28) and batch["svhn"].shape == (8, 3, 32, 32)
    assert batch["label"].dtype.is_floating_point is False


def test_raw_encoding_streams_the_same_pairs_as_png(tmp_path):
    png, _ = _build(tmp_path, "png", workers=1)
    raw, manifest = _build(tmp_path, "raw", workers=1, encoding="raw")
    assert [m["encoding"] for m in manifest["modalities"]] == ["raw", "raw"]
    assert manifest["builder"]["encoding"] == "raw" and shards.verify(raw, progress=False)["samples"] > 0
    key, sample = next(shards.iter_tar_samples(raw / "train-000000.tar"))
    assert sorted(sample) == ["cls", "raw"] and len(sample["raw"]) == 1 * 28 * 28 + 3 * 32 * 32
    for split in shards.SPLITS:
        a = list(stream.make_loader(png, batch_size=8, num_workers=0, split=split, drop_last=False))
        b = list(stream.make_loader(raw, batch_size=8, num_workers=0, split=split, drop_last=False))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert all(torch.equal(x[k], y[k]) for k in ("mnist", "svhn", "label"))
    assert mnist_svhn.write_grid(raw, tmp_path / "grid.png", rows=2, columns=2).is_file()
    with pytest.raises(ValueError, match="--encoding 'jpeg'"):
        build_mnist_svhn(mnist_svhn.MnistSvhnSpec(out=str(tmp_path / "j"), encoding="jpeg"), progress=False)


def test_existing_output_is_refused(tmp_path):
    out, _ = _build(tmp_path, "a", workers=1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _build(tmp_path, "a", workers=1)


def test_both_generated_builders_share_the_common_flags():
    """mnist-svhn and birds get --out/--seed/--num-*/--shard-size/--workers/--overwrite/--grid from one
    helper, with their own defaults, types and help; the mnist-svhn default factor is the modest one."""
    import argparse

    from mmebm_dist.commands.data import BUILDERS

    parsers = {}
    for name in ("mnist-svhn", "birds"):
        parsers[name] = argparse.ArgumentParser(prog=name)
        BUILDERS[name][0](parsers[name])
    ms = parsers["mnist-svhn"].parse_args(["--out", "x"])
    assert (ms.num_train, ms.num_test, ms.shard_size, ms.seed, ms.workers) == (73257, 26032, 1000, 0, 0)
    assert ms.factor == 2 and ms.max_per_class == 10000 and ms.source == "mnist" and ms.grid is None
    assert mnist_svhn.MnistSvhnSpec().factor == 2 and ms.encoding == "png"
    assert parsers["birds"].parse_args(["--out", "y", "--encoding", "raw"]).encoding == "raw"
    bd = parsers["birds"].parse_args(["--out", "y", "--overwrite", "--grid", "g.png", "--num-test", "3"])
    assert (bd.num_train, bd.num_test, bd.shard_size, bd.overwrite, bd.grid) == (8855, 3, 500, True, "g.png")
    with pytest.raises(SystemExit):  # street numbers need one image per class
        parsers["mnist-svhn"].parse_args(["--out", "x", "--num-train", "9"])
    with pytest.raises(SystemExit):
        parsers["birds"].parse_args(["--out", "y", "--shard-size", "0"])
    assert "112,136 train + 20,000 test pairs" in parsers["mnist-svhn"].format_help().replace("\n", " ")
