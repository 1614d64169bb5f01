"""``mmebm data import``: each format imports, verifies and trains; bad input is a named error that leaves
nothing behind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmebm_dist.cli import main
from mmebm_dist.data import shards
from mmebm_dist.data.codec import decode_png
from mmebm_dist.data.text import Vocabulary, normalize
from mmebm_dist.datasets.importers.common import ImportDataError
from tests.import_helpers import (
    cub_source,
    mnist_svhn_source,
    polymnist_folders,
    table_source,
    tiny_train,
    webdataset_source,
    write_png,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def samples(directory: Path, split: str) -> list[dict[str, bytes]]:
    manifest = shards.read_manifest(directory)
    return [
        s
        for e in shards.split_shards(manifest, split)
        for _, s in shards.iter_tar_samples(directory / e["name"])
    ]


def run_import(*args: str) -> int:
    args = tuple(map(str, args))
    return main(["data", "import", *args, *(() if "--workers" in args else ("--workers", "1"))])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


def test_polymnist_folders_import_matches_files_and_trains(tmp_path):
    src = polymnist_folders(tmp_path)
    out = tmp_path / "imported"
    assert run_import("polymnist-folders", src, "--out", out, "--shard-size", "10") == 0
    manifest = shards.read_manifest(out)
    assert [m["name"] for m in manifest["modalities"]] == ["m0", "m1"]
    assert [m["shape"] for m in manifest["modalities"]] == [[3, 28, 28]] * 2
    assert {s: manifest["splits"][s]["count"] for s in ("train", "test")} == {"train": 24, "test": 8}
    assert manifest["splits"]["train"]["shards"] == 3
    assert shards.verify(out, progress=False) == {"shards": 4, "samples": 32}
    for i, sample in enumerate(samples(out, "test")):
        for m in ("m0", "m1"):
            (path,) = (src / "test" / m).glob(f"{i}.*.png")
            assert int(sample["cls"]) == int(path.name.split(".")[1])
            np.testing.assert_array_equal(decode_png(sample[f"{m}.png"]), np.asarray(Image.open(path)))
    tiny_train(out, tmp_path / "run")


def test_mnist_svhn_pairs_by_class_as_mmvae_and_trains(tmp_path):
    from scipy.io import loadmat

    src = mnist_svhn_source(tmp_path)
    out = tmp_path / "imported"
    assert run_import("mnist-svhn", src, "--out", out, "--factor", "2", "--max-per-class", "2") == 0
    manifest = shards.read_manifest(out)
    # per class n = min(#MNIST (4 train / 2 test), #SVHN (1 + d % 3 train / 1 test), 2), times factor 2
    train_n = [2 * min(4, 1 + d % 3, 2) for d in range(10)]
    assert manifest["builder"]["pairs_per_class"] == {"train": train_n, "test": [2] * 10}
    assert manifest["splits"]["train"]["count"] == sum(train_n)
    assert [m["shape"] for m in manifest["modalities"]] == [[1, 28, 28], [3, 32, 32]]
    svhn = loadmat(src / "test_32x32.mat")
    pairs = np.load(out / "pairs-test.npy")
    for (a, b), sample in zip(pairs, samples(out, "test"), strict=True):
        label = int(sample["cls"])
        assert a % 10 == label and int(svhn["y"][b, 0]) % 10 == label  # the fixture's MNIST label is i % 10
        np.testing.assert_array_equal(decode_png(sample["svhn.png"]), svhn["X"][:, :, :, b])
    assert shards.verify(out, progress=False)["samples"] == sum(train_n) + 20
    tiny_train(out, tmp_path / "run")
    (src / "test_32x32.mat").unlink()
    assert run_import("mnist-svhn", src, "--out", tmp_path / "again") == 1
    assert_nothing_written(tmp_path / "again")


def test_cub_captions_one_tuple_per_caption_and_trains(tmp_path):
    src, captions = cub_source(tmp_path)
    out = tmp_path / "imported"
    assert run_import("cub-captions", src, "--out", out, "--min-count", "1", "--shard-size", "16") == 0
    manifest = shards.read_manifest(out)
    assert {s: manifest["splits"][s]["count"] for s in ("train", "test")} == {"train": 30, "test": 10}
    assert manifest["class_names"] == ["001.Albatross", "002.Bunting", "003.Cardinal"]
    assert manifest["modalities"][0]["shape"] == [3, 64, 64]
    vocab = Vocabulary.load(out)
    train = samples(out, "train")
    for j, sample in enumerate(train):
        ids = np.load(__import__("io").BytesIO(sample["caption.npy"]))
        assert vocab.decode(ids) == normalize(captions["train"][j])
        assert int(sample["cls"]) == (0 if j < 20 else 1)  # image j // 10: two albatrosses, one bunting
        assert decode_png(sample["image.png"]).shape == (64, 64, 3)
    assert train[0]["image.png"] == train[9]["image.png"] != train[10]["image.png"]
    assert [int(s["cls"]) for s in samples(out, "test")] == [2] * 10
    shards.verify(out, progress=False)
    tiny_train(out, tmp_path / "run")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_table_import_and_train(tmp_path, fmt):
    table = table_source(tmp_path / "t", fmt=fmt)
    out = tmp_path / "out"
    assert (
        run_import(
            "table",
            table,
            "--out",
            out,
            "--modality",
            "photo=image",
            "--modality",
            "signal=npy",
            "--modality",
            "note=text",
            "--label",
            "label",
            "--key",
            "key",
            "--max-tokens",
            "8",
        )
        == 0
    )
    manifest = shards.read_manifest(out)
    assert {s: manifest["splits"][s]["count"] for s in ("train", "test")} == {"train": 24, "test": 6}
    assert [(m["name"], m["shape"], m["dtype"]) for m in manifest["modalities"]] == [
        ("photo", [3, 12, 16], "uint8"),
        ("signal", [16], "float32"),
        ("note", [8], "int64"),
    ]
    rows = (
        [json.loads(line) for line in (tmp_path / "t/table.jsonl").read_text().splitlines()]
        if fmt == "jsonl"
        else None
    )
    test = samples(out, "test")
    assert [int(s["cls"]) for s in test] == [i % 3 for i in range(0, 30, 5)]
    first = np.load(__import__("io").BytesIO(test[0]["signal.npy"]))
    np.testing.assert_allclose(first, np.load(tmp_path / "t/sig/0.npy").astype(np.float32))
    assert (
        Vocabulary.load(out).decode(np.load(__import__("io").BytesIO(test[0]["note.npy"])))
        == "sample even number"
    )
    if rows is not None:
        assert rows[0]["photo"] == "img/0.png"
        np.testing.assert_array_equal(
            decode_png(test[0]["photo.png"]), np.asarray(Image.open(tmp_path / "t/img/0.png"))
        )
        tiny_train(out, tmp_path / "run")


def test_webdataset_import_in_place_and_train(tmp_path):
    src = webdataset_source(tmp_path / "wds")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.tar")}
    assert run_import("webdataset", src) == 0
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.tar")} == before
    manifest = shards.read_manifest(src)
    assert [(m["name"], m["shape"], m["encoding"]) for m in manifest["modalities"]] == [
        ("image", [3, 8, 8], "png"),
        ("vec", [5], "npy"),
    ]
    assert [(e["name"], e["split"], e["count"]) for e in manifest["shards"]] == [
        ("train-000.tar", "train", 10),
        ("train-001.tar", "train", 8),
        ("test-000.tar", "test", 6),
    ]
    assert manifest["class_names"] == ["0", "1", "2", "3"]
    assert shards.verify(src, progress=False) == {"shards": 3, "samples": 24}
    assert run_import("webdataset", src) == 1  # a manifest is there: refused without --overwrite
    tiny_train(src, tmp_path / "run")


# ------------------------------------------------------------------------------------------- bad input


def _error(capsys, *args) -> str:
    assert run_import(*args) == 1
    return capsys.readouterr().err


def test_missing_file_names_file_and_row(tmp_path, capsys):
    table = table_source(tmp_path / "t", rows=10)
    (tmp_path / "t/img/7.png").unlink()
    out = tmp_path / "out"
    err = _error(capsys, "table", table, "--out", out, "--modality", "photo=image")
    assert "img/7.png" in err and "does not exist" in err and "line 8" in err
    assert_nothing_written(out)


def test_image_sizes_differ_unless_resized(tmp_path, capsys):
    src = polymnist_folders(tmp_path, train=10, test=4)
    bad = next((src / "train/m1").glob("6.*.png"))
    write_png(bad, np.zeros((30, 28, 3), np.uint8))
    out = tmp_path / "out"
    err = _error(capsys, "polymnist-folders", src, "--out", out)
    assert str(bad) in err and "--resize" in err
    assert_nothing_written(out)
    assert run_import("polymnist-folders", src, "--out", out, "--resize", "28x28") == 0
    assert shards.read_manifest(out)["splits"]["train"]["count"] == 10


def test_colour_image_in_a_grey_modality(tmp_path, capsys):
    table = table_source(tmp_path / "t", rows=6)
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    write_png(tmp_path / "t" / rows[1]["photo"], np.zeros((12, 16), np.uint8))  # the first train row: grey
    out = tmp_path / "out"
    err = _error(capsys, "table", table, "--out", out, "--modality", "photo=image")
    assert "colour image (RGB) in a modality whose first image is grey" in err and "line 3" in err
    assert_nothing_written(out)


def test_undecodable_image(tmp_path, capsys):
    src = polymnist_folders(tmp_path, train=10, test=4)
    bad = next((src / "test/m0").glob("2.*.png"))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    err = _error(capsys, "polymnist-folders", src, "--out", out)
    assert str(bad) in err and "cannot decode" in err
    assert_nothing_written(out)


def test_non_utf8_captions(tmp_path, capsys):
    src, _ = cub_source(tmp_path)
    path = src / "text_testclasses.txt"
    lines = path.read_text().splitlines()
    lines[3] = "a caf\xe9 coloured bird"
    path.write_bytes("\n".join(lines).encode("latin-1"))
    out = tmp_path / "out"
    err = _error(capsys, "cub-captions", src, "--out", out)
    assert str(path) in err and "line 4 is not UTF-8" in err
    assert_nothing_written(out)


def test_duplicate_keys(tmp_path, capsys):
    table = table_source(tmp_path / "t", rows=6)
    rows = table.read_text().splitlines()
    rows[4] = rows[4].replace('"key": "r4"', '"key": "r1"')
    table.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    err = _error(capsys, "table", table, "--out", out, "--modality", "photo=image", "--key", "key")
    assert "line 5: duplicate key 'r1' (first on line 2)" in err
    assert_nothing_written(out)

    src = polymnist_folders(tmp_path / "p", train=6, test=2)
    first = next((src / "train/m0").glob("3.*.png"))
    (first.parent / f"0{first.name}").write_bytes(first.read_bytes())  # 03.L.png: the same key as 3.L.png
    err = _error(capsys, "polymnist-folders", src, "--out", out)
    assert f"duplicate key 3.{first.name.split('.')[1]}" in err
    assert_nothing_written(out)

    wds_dir = webdataset_source(tmp_path / "wds")
    (wds_dir / "test-001.tar").write_bytes((wds_dir / "test-000.tar").read_bytes())
    err = _error(capsys, "webdataset", wds_dir)
    assert "test-001.tar" in err and "duplicate key 's00018'" in err
    assert not (wds_dir / "manifest.json").exists()


def test_table_row_missing_a_modality_errors_or_skips(tmp_path, capsys):
    table = table_source(tmp_path / "t", rows=10)
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    del rows[2]["signal"]
    rows[6]["signal"] = ""
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ("table", table, "--out", out, "--modality", "photo=image", "--modality", "signal=npy")
    err = _error(capsys, *args)
    assert f"{table}: line 3: no value for modality 'signal'" in err and "--on-missing skip" in err
    assert_nothing_written(out)
    assert run_import(*args, "--on-missing", "skip") == 0
    manifest = shards.read_manifest(out)
    assert manifest["builder"]["skipped_rows"] == 2
    assert sum(manifest["splits"][s]["count"] for s in ("train", "test")) == 8
    assert manifest["builder"]["labelled"] is False
    assert {int(s["cls"]) for s in samples(out, "train")} == {-1}


def test_label_not_an_integer(tmp_path, capsys):
    table = table_source(tmp_path / "t", rows=6, fmt="csv")
    text = table.read_text().splitlines()
    assert ",1,train" in text[5]  # data row i = 4, on line 6
    text[5] = text[5].replace(",1,train", ",one,train")
    table.write_text("\n".join(text) + "\n")
    out = tmp_path / "out"
    err = _error(capsys, "table", table, "--out", out, "--modality", "photo=image", "--label", "label")
    assert f"{table}: line 6, column 'label': label 'one' is not an integer" in err
    assert_nothing_written(out)

    src = polymnist_folders(tmp_path / "p", train=6, test=2)
    for m in ("m0", "m1"):
        path = next((src / "train" / m).glob("4.*.png"))
        path.rename(path.with_name("4.x.png"))
    err = _error(capsys, "polymnist-folders", src, "--out", out)
    assert "4.x.png: label 'x' is not an integer" in err
    assert_nothing_written(out)


def test_failed_import_keeps_the_previous_data_set(tmp_path, capsys):
    """--overwrite replaces DIR only when the new import succeeds."""
    src = polymnist_folders(tmp_path, train=6, test=2)
    out = tmp_path / "out"
    assert run_import("polymnist-folders", src, "--out", out) == 0
    before = (out / "manifest.json").read_text()
    assert _error(capsys, "polymnist-folders", src, "--out", out).count("--overwrite") == 1
    next((src / "train/m0").glob("1.*.png")).write_bytes(b"junk")
    assert "cannot decode" in _error(capsys, "polymnist-folders", src, "--out", out, "--overwrite")
    assert (out / "manifest.json").read_text() == before
    assert not list(tmp_path.glob(".out.*"))


def test_importer_errors_are_import_data_errors(tmp_path):
    from mmebm_dist.datasets.importers.table import import_table

    with pytest.raises(ImportDataError, match="no .tar shards"):
        from mmebm_dist.datasets.importers.webdataset import import_webdataset

        (tmp_path / "empty").mkdir()
        import_webdataset(tmp_path / "empty")
    with pytest.raises(ImportDataError, match="unknown table type"):
        (tmp_path / "t.xlsx").write_text("x")
        import_table(tmp_path / "t.xlsx", tmp_path / "o", modalities=[("a", "image")])


def test_polymnist_authors_naming_numbers_files_per_class(tmp_path):
    """The authors' generator restarts the index for every digit (0.0.png, 0.1.png, ...): a tuple is one file
    name across the modality folders, whatever order a listing gives."""
    rng = np.random.default_rng(0)
    src = tmp_path / "MMNIST"
    per_class = {0: 3, 1: 2, 7: 4}
    for split in ("train", "test"):
        for m in ("m0", "m1", "m2"):
            for digit, count in per_class.items():
                for i in range(count):
                    pixels = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
                    pixels[0, 0] = (i, digit, int(m[1]))  # which file this is, readable after the import
                    write_png(src / split / m / f"{i}.{digit}.png", pixels)
    out = tmp_path / "out"
    assert run_import("polymnist-folders", src, "--out", out, "--workers", "2", "--shard-size", "4") == 0
    train = samples(out, "train")
    assert len(train) == 9 and shards.read_manifest(out)["splits"]["test"]["count"] == 9
    keys = []
    for sample in train:
        tags = [tuple(decode_png(sample[f"m{k}.png"])[0, 0]) for k in range(3)]
        assert [t[2] for t in tags] == [0, 1, 2] and len({t[:2] for t in tags}) == 1  # one name per tuple
        assert tags[0][1] == int(sample["cls"])
        keys.append(tags[0][:2])
    assert keys == sorted((i, d) for d, n in per_class.items() for i in range(n))


def test_errors_from_worker_processes_name_the_file(tmp_path, capsys):
    table = table_source(tmp_path / "t", rows=12)
    (tmp_path / "t/img/9.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    err = _error(capsys, "table", table, "--out", out, "--modality", "photo=image", "--workers", "2")
    assert "img/9.png" in err and "cannot decode" in err and "line 10" in err
    assert_nothing_written(out)
