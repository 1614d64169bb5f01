"""Raw encoding, convert, train-time shard checks, safe shard names, per-epoch shard moves, epoch refill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from data_helpers import restamp, sample_ids, write_idx

from mmebm_dist.data import shards
from mmebm_dist.data.stream import (
    SkipTally,
    epoch_batches,
    images_to_float,
    make_loader,
    prefetch_to_device,
)
from mmebm_dist.datasets.polymnist import BuildSpec, build_polymnist


def build(root: Path, encoding: str, *, train: int = 40, shard_size: int = 8) -> Path:
    """The tiny 3-modality set of the stream tests, with images stored as ``encoding``."""
    idx = root / "idx"
    if not idx.exists():
        write_idx(idx)
    out = root / f"{encoding}-{train}-{shard_size}"
    build_polymnist(BuildSpec(source="idx", idx_dir=str(idx), modalities=3, out=str(out), num_samples=train,
                              test_samples=12, shard_size=shard_size, workers=1, encoding=encoding),
                    progress=False)
    return out


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("raw"), "png")


@pytest.fixture(scope="module")
def raw(png) -> Path:
    return build(png.parent, "raw")


def batches(data: Path, **kw) -> list[dict[str, torch.Tensor]]:
    return list(make_loader(data, batch_size=5, num_workers=0, drop_last=False, **kw))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(y)
        for name in x:
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def test_raw_build_streams_the_same_batches_as_png(png, raw):
    manifest = shards.read_manifest(raw)
    assert [m["encoding"] for m in manifest["modalities"]] == ["raw"] * 3
    assert all(e["bytes"] == (raw / e["name"]).stat().st_size for e in manifest["shards"])
    key, sample = next(shards.iter_tar_samples(raw / "train-000000.tar"))
    assert sorted(sample) == ["cls", "raw"] and len(sample["raw"]) == 3 * 3 * 28 * 28  # one record per tuple
    assert shards.verify(raw, progress=False) == {"shards": 7, "samples": 52}
    for kw in ({}, {"shuffle_buffer": 6, "seed": 3, "epoch": 1}, {"split": "test"}):
        assert_same_batches(batches(png, **kw), batches(raw, **kw))


def test_images_cross_the_worker_queue_as_uint8_and_convert_exactly(png, raw):
    for data in (png, raw):
        floats = list(make_loader(data, batch_size=5, num_workers=1, drop_last=False))
        assert_same_batches(floats, batches(data))  # a DataLoader worker (shared-memory batches) = in-process
        loader = make_loader(data, batch_size=5, num_workers=1, drop_last=False, float_images=False)
        ints = list(loader)
        assert loader.images == ("m0", "m1", "m2") and len(ints) == len(floats)
        for f, u in zip(floats, ints, strict=True):
            converted = images_to_float(u, loader.images)
            assert torch.equal(u["label"], f["label"])
            for name in loader.images:
                assert u[name].dtype == torch.uint8 and u[name].shape == f[name].shape
                assert f[name].shape == (len(u["label"]), 3, 28, 28)
                assert f[name].is_contiguous() and torch.equal(converted[name], f[name])
                assert torch.equal(u[name].float() / 255, f[name]) and 0 < f[name].max() <= 1


def test_convert_png_to_raw_and_back_is_lossless_and_atomic(png, raw, tmp_path):
    to_raw = shards.convert(png, tmp_path / "raw", "raw", progress=False)
    assert [m["encoding"] for m in to_raw["modalities"]] == ["raw"] * 3
    assert_same_batches(batches(png), batches(tmp_path / "raw"))
    # The built raw set and the converted one hold the same bytes; back to png gives the original shards.
    def digests(manifest: dict) -> list[str]:
        return [e["sha256"] for e in manifest["shards"]]

    assert digests(to_raw) == digests(shards.read_manifest(raw))
    back = shards.convert(tmp_path / "raw", tmp_path / "png", "png", progress=False)
    assert digests(back) == digests(shards.read_manifest(png))
    with pytest.raises(FileExistsError, match="already exists"):
        shards.convert(png, tmp_path / "raw", "raw", progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(png, bad)
    (bad / "train-000003.tar").write_bytes((bad / "train-000003.tar").read_bytes()[:5000])
    with pytest.raises(shards.ShardError, match="train-000003.tar"):
        shards.convert(bad, tmp_path / "half", "raw", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "png", "raw"]  # no DST, no leftovers


def test_raw_record_of_the_wrong_size_is_named_or_skipped(raw, tmp_path):
    data = tmp_path / "short"
    shutil.copytree(raw, data)
    path = data / "train-000001.tar"
    members = [(f"{key}.{ext}", blob[:-1] if (key, ext) == ("00000009", "raw") else blob)
               for key, sample in shards.iter_tar_samples(path) for ext, blob in sample.items()]
    shards.write_tar(path, members)
    restamp(data, path.name)
    message = r"train-000001.tar: sample '00000009' modality 'm0': raw record is 7055 bytes, .* need 7056"
    with pytest.raises(shards.ShardError, match=message):
        batches(data)
    with pytest.raises(shards.ShardError, match=message):
        shards.verify(data, progress=False)
    loader = make_loader(data, batch_size=5, num_workers=0, drop_last=False, on_error="skip")
    assert sum(len(b["label"]) for b in loader) == 39 and loader.skipped == 1


def test_shard_sizes_always_and_sha256_on_demand_are_checked_while_streaming(raw, tmp_path):
    data = tmp_path / "flipped"
    shutil.copytree(raw, data)
    path = data / "train-000002.tar"
    blob = bytearray(path.read_bytes())
    blob[512 + 100] ^= 0xFF  # a pixel of the first raw record: same size, still decodes
    path.write_bytes(bytes(blob))
    assert len(batches(data)) == 8  # not caught without the digest ...
    with pytest.raises(shards.ShardError, match=r"train-000002.tar: sha256 \w+ differs from the manifest's"):
        batches(data, check_sha256=True)  # ... caught with it
    path.write_bytes(bytes(blob) + bytes(512))
    with pytest.raises(shards.ShardError, match=r"train-000002.tar: \d+ bytes, the manifest says \d+"):
        batches(data)


@pytest.mark.parametrize("name", ["pipe:touch {marker}", "../outside.tar", "/etc/passwd", "a/../b.tar",
                                  "file:train-000000.tar", "./train-000000.tar", ""])
def test_manifest_shard_names_must_be_plain_relative_paths(png, tmp_path, name):
    data = tmp_path / "hostile"
    shutil.copytree(png, data)
    marker = tmp_path / "ran"
    manifest = json.loads((data / shards.MANIFEST).read_text())
    manifest["shards"][0]["name"] = name.format(marker=marker)
    shards.write_manifest(data, manifest)
    for action in (lambda: batches(data), lambda: shards.verify(data, progress=False)):
        with pytest.raises(shards.ShardError, match="is not a plain relative path"):
            action()
    assert not marker.exists()


def test_shards_move_between_ranks_each_epoch_and_every_sample_is_read_once(png):
    everything = sorted(i for b in batches(png) for i in sample_ids(b))
    per_epoch = []
    for epoch in range(4):
        ranks = [[i for b in batches(png, rank=r, world_size=2, shuffle_buffer=4, seed=1, epoch=epoch)
                  for i in sample_ids(b)] for r in range(2)]
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == everything
        per_epoch.append(frozenset(ranks[0]))
    assert len(set(per_epoch)) > 1  # rank 0 read other shards in some epoch
    # Without shuffling the assignment is the manifest's, the same every epoch.
    fixed = {frozenset(i for b in batches(png, rank=0, world_size=2, epoch=e) for i in sample_ids(b))
             for e in range(3)}
    assert len(fixed) == 1


def test_epoch_batches_bounds_every_shard_order(png, tmp_path):
    uneven = build(png.parent, "png", train=40, shard_size=7)  # shards of 7, 7, 7, 7, 7, 5
    bound = epoch_batches(uneven, batch_size=3, world_size=2, num_workers=1)
    assert bound == (5 + 7 + 7) // 3  # the rank that draws the 5-sample shard
    for epoch in range(4):
        counts = [len(list(make_loader(uneven, batch_size=3, num_workers=0, rank=r, world_size=2,
                                       shuffle_buffer=4, epoch=epoch))) for r in range(2)]
        assert min(counts) == bound and max(counts) == 21 // 3


def test_epoch_length_keeps_ranks_in_step_when_samples_are_skipped(png, tmp_path, caplog):
    data = tmp_path / "missing"
    shutil.copytree(png, data)
    (data / "train-000002.tar").unlink()  # rank 0's (manifest order, 2 ranks): 8 of its 24 samples
    length = epoch_batches(png, batch_size=4, world_size=2, num_workers=1)
    assert length == 4
    tally = SkipTally()
    for epoch in range(2):
        got = [len(list(tally.track(make_loader(data, batch_size=4, num_workers=0, rank=r, world_size=2,
                                                 epoch=epoch, on_error="skip", epoch_length=length))))
               for r in range(2)]
        assert got == [length, length]
    assert tally.total == 2  # the missing shard, once per epoch on rank 0
    with pytest.raises(shards.ShardError, match="train-000002.tar"):
        list(make_loader(data, batch_size=4, num_workers=0, rank=0, world_size=2, epoch_length=length))
    # A rank whose every shard is bad cannot fill its epoch: named, not an endless loop.
    for name in ("train-000000.tar", "train-000004.tar"):
        (data / name).unlink()
    with pytest.raises(shards.ShardError, match="every sample of this rank's shards was skipped"):
        list(make_loader(data, batch_size=4, num_workers=0, rank=0, world_size=2, on_error="skip",
                         epoch_length=length))


def test_refill_reuses_the_start_of_the_epoch_stream(png, tmp_path):
    data = tmp_path / "short"
    shutil.copytree(png, data)
    (data / "train-000004.tar").unlink()  # the last shard of rank 0's stream (manifest order)
    full = [sample_ids(b) for b in make_loader(png, batch_size=4, num_workers=0, rank=0, world_size=2)]
    filled = [sample_ids(b) for b in make_loader(data, batch_size=4, num_workers=0, rank=0, world_size=2,
                                                  on_error="skip", epoch_length=len(full))]
    assert filled == full[:4] + full[:2]  # 4 batches of shards 0 and 2, then the stream again from its start


def test_prefetch_to_device_leaves_cpu_batches_alone():
    items = [(0, 1, {"x": torch.ones(2)}), (0, 2, {"x": torch.zeros(2)})]
    out = list(prefetch_to_device(iter(items), torch.device("cpu")))
    assert len(out) == 2 and all(a is b for a, b in zip(out, items, strict=True))


def test_bare_urls_of_raw_shards_need_the_manifest(raw):
    with pytest.raises(shards.ShardError, match="raw bytes, whose shape only a manifest gives"):
        batches(str(raw / "train-000000.tar"))


def test_cli_convert_and_verify(png, tmp_path, capsys):
    from mmebm_dist.cli import main

    assert main(["data", "convert", str(png), "--encoding", "raw", "--out", str(tmp_path / "r")]) == 0
    assert "images raw" in capsys.readouterr().out
    assert main(["data", "verify", str(tmp_path / "r")]) == 0
    assert main(["data", "convert", str(png), "--encoding", "raw", "--out", str(tmp_path / "r")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_shard_url_template_reads_the_manifest_shards_through_a_command(png):
    via_pipe = batches(png, shard_url=f"pipe:cat {png}/{{name}}", shuffle_buffer=4, rank=1, world_size=2)
    assert_same_batches(via_pipe, batches(png, shuffle_buffer=4, rank=1, world_size=2))
    with pytest.raises(ValueError, match="lacks '{name}'"):
        batches(png, shard_url="pipe:cat x.tar")
    with pytest.raises(shards.ShardError, match="shard_url needs a manifest"):
        batches(str(png / "train-000000.tar"), shard_url="pipe:cat {name}")
