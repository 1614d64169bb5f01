"""Fast codecs: our PNGs are standard PNGs, foreign PNGs still decode, the tar reader matches tarfile."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmebm_dist.data.codec import (
    FormatError,
    decode_png,
    encode_png,
    group_samples,
    iter_tar_members,
    read_shard,
)


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 1), (5, 7, 2), (28, 28, 3), (9, 4, 4)])
def test_png_roundtrip_and_pil_agrees(shape):
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    data = encode_png(image)
    expected = image if image.ndim == 3 else image[:, :, None]
    np.testing.assert_array_equal(decode_png(data), expected)
    with Image.open(io.BytesIO(data)) as img:  # a standard PNG: PIL reads the same pixels
        pil = np.asarray(img)
    np.testing.assert_array_equal(pil if pil.ndim == 3 else pil[:, :, None], expected)
    assert encode_png(image) == data  # deterministic bytes


def test_foreign_pngs_with_row_filters_decode_through_pil():
    image = np.random.default_rng(1).integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
    image[:, :14] = image[:, :1]  # smooth half: PIL's adaptive filter picks Sub/Up/Paeth rows
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    np.testing.assert_array_equal(decode_png(buf.getvalue()), image)


def test_corrupt_pngs_raise():
    data = encode_png(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FormatError, match="not a PNG"):
        decode_png(b"GIF89a" + data[6:])
    with pytest.raises(FormatError, match="truncated PNG"):
        decode_png(data[:-20])
    broken = bytearray(data)
    broken[45] ^= 0xFF  # inside the zlib stream
    with pytest.raises(FormatError):
        decode_png(bytes(broken))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(fmt):
    names = ["a.txt", "dir/b.cls", "d" * 120 + "/long.name.png", "üñí/c.png", "empty.bin"]
    blobs = [b"hello", b"7", bytes(range(256)) * 3, b"x" * 513, b""]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("dir"), None)  # a directory-like entry is skipped
        for name, blob in zip(names, blobs, strict=True):
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100 and "/" not in name[-100:]:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    buf.seek(0)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    assert list(iter_tar_members(io.BytesIO(buf.getvalue()))) == expected
    assert len(expected) >= 4


def test_tar_reader_detects_truncation_and_bad_headers():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("k1.a", "k1.b"):
            info = tarfile.TarInfo(name)
            info.size = 600
            tar.addfile(info, io.BytesIO(b"z" * 600))
    data = buf.getvalue()
    with pytest.raises(FormatError, match="truncated tar member 'k1.b'"):
        list(iter_tar_members(io.BytesIO(data[:1536 + 512 + 100]), "shard.tar"))
    with pytest.raises(FormatError, match="shard.tar: truncated tar header .* after member 'k1.a'"):
        list(iter_tar_members(io.BytesIO(data[:1536 + 100]), "shard.tar"))
    broken = bytearray(data)
    broken[3] ^= 0x01  # name byte of the first header: checksum no longer matches
    with pytest.raises(FormatError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(broken)), "shard.tar"))


def test_grouping_follows_webdataset_keys():
    members = [("x/s1.m0.png", b"a"), ("x/s1.CLS", b"1"), ("x/s2.m0.png", b"b"), ("__meta__.json", b"{}")]
    samples = list(group_samples(iter(members), "u"))
    assert samples == [
        {"__key__": "x/s1", "__url__": "u", "m0.png": b"a", "cls": b"1"},
        {"__key__": "x/s2", "__url__": "u", "m0.png": b"b"},
    ]
    with pytest.raises(FormatError, match="'s' has 'png' twice"):
        list(group_samples(iter([("s.png", b""), ("s.png", b"")]), "u"))


@pytest.mark.parametrize("compress", [False, True])
def test_read_shard_plain_gzipped_and_through_a_pipe(tmp_path, compress):
    path = tmp_path / ("s.tar.gz" if compress else "s.tar")
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for i in range(3):
            for ext, blob in (("m0.png", bytes([i]) * 700), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    for url in (str(path), f"pipe:cat {path}"):
        samples = list(read_shard(url))
        assert [s["__key__"] for s in samples] == ["0000", "0001", "0002"]
        assert samples[2]["m0.png"] == b"\x02" * 700 and samples[1]["cls"] == b"1"
        assert samples[0]["__url__"] == url
    with pytest.raises(OSError, match="exit"):
        list(read_shard(f"pipe:cat {tmp_path}/missing.tar"))
