"""Streaming loader: batch format, rank/worker split, epoch planning, exact resume, bad input."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import build_tiny, restamp, sample_ids

from mmebm_dist.data import shards
from mmebm_dist.data.codec import decode_png
from mmebm_dist.data.stream import epoch_batches, make_loader, rank_batches, replay_round_robin

# The tiny set: 40 train samples in 5 shards of 8, 12 test samples in shards of 8 and 4; 3 modalities.
# 2 ranks x 2 workers: rank 0 reads shards 0, 2, 4 (worker 0: shards 0 and 4, worker 1: shard 2), rank 1 reads
# shards 1 and 3 (one per worker): uneven on purpose.


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("stream"), modalities=3, train=40, test=12, shard_size=8)


def ids_of(loader) -> list[str]:
    return [i for batch in loader for i in sample_ids(batch)]


def all_ids(data: Path, split: str = "train") -> list[str]:
    return ids_of(make_loader(data, batch_size=64, num_workers=0, split=split, drop_last=False))


def test_batches_are_float_images_in_unit_range_and_int64_labels(data):
    batch = next(iter(make_loader(data, batch_size=6, num_workers=0)))
    assert sorted(batch) == ["label", "m0", "m1", "m2"]
    for name in ("m0", "m1", "m2"):
        assert batch[name].shape == (6, 3, 28, 28) and batch[name].dtype == torch.float32
        assert batch[name].is_contiguous() and 0.0 <= batch[name].min() and batch[name].max() <= 1.0
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [0, 1, 2, 3, 4, 5]
    first = next(shards.iter_tar_samples(data / "train-000000.tar"))[1]
    expected = torch.from_numpy(decode_png(first["m1.png"]).astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(batch["m1"][0], expected, rtol=0, atol=0)  # exact: same float32 division


def test_epoch_batches_from_the_manifest_match_the_loader(data):
    assert rank_batches(data, batch_size=5, world_size=2, num_workers=2) == [4, 2]  # (3 + 1), (1 + 1)
    assert epoch_batches(data, batch_size=5, world_size=2, num_workers=2) == 2
    assert epoch_batches(data, batch_size=5, world_size=1, num_workers=0) == 8
    assert epoch_batches(data, batch_size=4, world_size=1, num_workers=1, split="test") == 3
    for rank in range(2):
        loader = make_loader(data, batch_size=5, num_workers=0, rank=rank, world_size=2, shuffle_buffer=3)
        # num_workers=0 is one stream: the manifest count for num_workers=1 applies.
        planned = rank_batches(data, batch_size=5, world_size=2, num_workers=1)[rank]
        assert len(list(loader)) == len(loader) == planned


@pytest.mark.slow
def test_two_ranks_by_two_workers_see_every_sample_exactly_once(data):
    expected = all_ids(data)
    assert len(set(expected)) == 40
    per_rank = []
    for rank in range(2):
        loader = make_loader(data, batch_size=3, num_workers=2, rank=rank, world_size=2, shuffle_buffer=5,
                             seed=7, drop_last=False)
        per_rank.append(ids_of(loader))
    assert [len(r) for r in per_rank] == [24, 16]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(expected)
    # In training mode (train split) partial batches are dropped: every batch is full.
    train = make_loader(data, batch_size=3, num_workers=2, rank=0, world_size=2, shuffle_buffer=5)
    sizes = [len(b["label"]) for b in train]
    assert sizes == [3] * len(train) and len(sizes) == 7  # worker 0: 16 // 3, worker 1: 8 // 3


def test_rank_defaults_to_torch_distributed(data, monkeypatch):
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    implicit = ids_of(make_loader(data, batch_size=4, num_workers=0, drop_last=False))
    explicit = ids_of(make_loader(data, batch_size=4, num_workers=0, rank=1, world_size=2, drop_last=False))
    assert implicit == explicit and len(implicit) == 16
    with pytest.raises(ValueError, match="rank 2 out of range"):
        make_loader(data, batch_size=4, rank=2, world_size=2)


def test_deterministic_given_seed_and_epoch(data):
    def run(**kw):
        return ids_of(make_loader(data, batch_size=4, num_workers=0, shuffle_buffer=10, **kw))

    a = run(seed=1, epoch=0)
    assert a == run(seed=1, epoch=0)
    b = run(seed=1, epoch=1)
    assert a != b and sorted(a) == sorted(b)
    assert run(seed=2, epoch=0) != a
    assert ids_of(make_loader(data, batch_size=4, num_workers=0)) == all_ids(data)  # manifest order


@pytest.mark.parametrize("shuffle_buffer", [0, 6])
def test_skip_batches_resumes_exactly_in_process(data, shuffle_buffer):
    kw = dict(batch_size=3, num_workers=0, shuffle_buffer=shuffle_buffer, seed=3, epoch=2)
    full = list(make_loader(data, **kw))
    for k in (1, 3, 5, len(full) - 1, len(full), len(full) + 2):
        resumed = list(make_loader(data, skip_batches=k, **kw))
        assert len(resumed) == max(0, len(full) - k)
        for x, y in zip(full[k:], resumed, strict=True):
            for name in x:
                assert torch.equal(x[name], y[name])


@pytest.mark.slow
def test_skip_batches_resumes_exactly_across_workers(data):
    # Rank 0, 2 workers: worker 0 yields 6 batches of 3 (last partial), worker 1 yields 3: the round-robin
    # is w0 w1 w0 w1 w0 w1 w0 w0 w0, so the cut points cover both workers, a padded round and exhaustion.
    kw = dict(batch_size=3, num_workers=2, shuffle_buffer=6, seed=5, rank=0, world_size=2, drop_last=False)
    full = [sample_ids(b) for b in make_loader(data, **kw)]
    assert [len(b) for b in full] == [3, 3, 3, 3, 3, 2, 3, 3, 1]
    for k in (1, 4, 5, 7):
        assert [sample_ids(b) for b in make_loader(data, skip_batches=k, **kw)] == full[k:], k


def test_replay_round_robin():
    assert replay_round_robin([3, 1, 2], 4) == ([2, 1, 1], [True, False, False])
    assert replay_round_robin([3, 1, 2], 6) == ([3, 1, 2], [False, False, False])
    assert replay_round_robin([3, 1, 2], 99) == ([3, 1, 2], [False, False, False])
    assert replay_round_robin([None, None], 5) == ([3, 2], [True, False])
    assert replay_round_robin([2, 2], 0) == ([0, 0], [False, False])


def test_resampled_stream_is_infinite_and_seeded(data):
    def take(seed, n=25):
        it = iter(make_loader(data, batch_size=4, num_workers=0, resampled=True, seed=seed, shuffle_buffer=4))
        return [i for _ in range(n) for i in sample_ids(next(it))]

    a = take(0)
    assert len(a) == 100 > 40 and set(a) <= set(all_ids(data))
    assert a == take(0) and a != take(1)


def test_shard_urls_with_pipe(data):
    urls = f"pipe:cat {data}/train-{{000000..000004}}.tar"
    via_pipe = make_loader(urls, batch_size=7, num_workers=0, drop_last=False)
    assert ids_of(via_pipe) == all_ids(data)
    with pytest.raises(shards.ShardError, match="need a manifest"):
        epoch_batches(urls, batch_size=4, world_size=1, num_workers=1)
    missing = make_loader(f"pipe:cat {data}/nope.tar", batch_size=4, num_workers=0)
    with pytest.raises(shards.ShardError, match="nope.tar"):
        list(missing)


@pytest.fixture
def broken(data, tmp_path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(data, copy)
    return copy


def test_missing_shard_raises_or_is_skipped_and_counted(broken, caplog):
    (broken / "train-000002.tar").unlink()
    with pytest.raises(shards.ShardError, match="train-000002.tar"):
        list(make_loader(broken, batch_size=4, num_workers=0))
    loader = make_loader(broken, batch_size=4, num_workers=0, on_error="skip", drop_last=False)
    with caplog.at_level(logging.WARNING, logger="mmebm_dist.data"):
        assert len(ids_of(loader)) == 32
    assert loader.skipped == 1
    assert any("train-000002.tar" in r.getMessage() for r in caplog.records)


def test_truncated_shard_names_shard_and_last_key(broken):
    path = broken / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:9000])
    # The manifest's byte size catches it before reading; without sizes (older manifests) the tar reader does.
    with pytest.raises(shards.ShardError, match=r"train-000001.tar: 9000 bytes, the manifest says \d+"):
        list(make_loader(broken, batch_size=4, num_workers=0))
    restamp(broken, "train-000001.tar")
    with pytest.raises(shards.ShardError, match=r"train-000001.tar: .*after member '00000008.m2.png'"):
        list(make_loader(broken, batch_size=4, num_workers=0))


def test_sample_lacking_a_modality(broken):
    path = broken / "train-000003.tar"
    members = [(f"{key}.{ext}", blob) for key, sample in shards.iter_tar_samples(path)
               for ext, blob in sample.items() if f"{key}.{ext}" != "00000027.m2.png"]
    shards.write_tar(path, members)
    restamp(broken, "train-000003.tar")
    with pytest.raises(shards.ShardError, match=
        r"train-000003.tar: sample '00000027' lacks modality 'm2'"):
        list(make_loader(broken, batch_size=4, num_workers=0))
    loader = make_loader(broken, batch_size=4, num_workers=0, on_error="skip", drop_last=False)
    assert len(ids_of(loader)) == 39 and loader.skipped == 1


@pytest.mark.slow
def test_worker_errors_reach_the_main_process(broken):
    (broken / "train-000004.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(shards.ShardError, match="train-000004.tar"):
        list(make_loader(broken, batch_size=4, num_workers=2))
    loader = make_loader(broken, batch_size=4, num_workers=2, on_error="skip", drop_last=False)
    assert len(ids_of(loader)) == 32 and loader.skipped == 1


def test_bad_arguments(data):
    with pytest.raises(shards.ShardError, match="split 'valid' not in the manifest"):
        make_loader(data, batch_size=4, split="valid")
    with pytest.raises(ValueError, match="on_error"):
        make_loader(data, batch_size=4, on_error="ignore")
    with pytest.raises(shards.ShardError, match="no manifest"):
        make_loader(data.parent / "idx", batch_size=4)
