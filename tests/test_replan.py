"""The rest of an interrupted epoch re-planned over new ranks/workers/batch sizes: every sample of the
uninterrupted epoch is read exactly once over the segments, except the counted few that do not fill a batch on
every new rank. Samples are counted by content digest through the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import build_tiny_polymnist

from mmebm_dist.data.replan import remainder_size
from mmebm_dist.data.stream import epoch_batches, make_loader
from mmebm_dist.train.metrics import sample_digests

MODALITIES = ["m0", "m1"]
SEED, EPOCH = 3, 1


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """72 tuples in shards of 16, 16, 16, 16, 8 (uneven on purpose)."""
    return build_tiny_polymnist(tmp_path_factory.mktemp("replan"), modalities=2, train=72, shard_size=16)


def _read(data: Path, *, world: int, workers: int, batch: int, shuffle: int, take: int | None = None,
          segments: tuple = (), skip: int = 0) -> list[str]:
    """Digests of the samples every rank reads in the epoch (the first ``take`` batches per rank, or all
    the loop would read: ``epoch_batches`` for a plain epoch, the loader's length for a re-planned one)."""
    per_epoch = epoch_batches(data, batch_size=batch, world_size=world, num_workers=workers)
    out = []
    for rank in range(world):
        loader = make_loader(data, batch_size=batch, num_workers=workers, shuffle_buffer=shuffle, seed=SEED,
                             epoch=EPOCH, rank=rank, world_size=world, segments=segments, skip_batches=skip,
                             epoch_length=None if segments else per_epoch)
        n = take if take is not None else len(loader)
        for i, b in enumerate(loader):
            if i == n:
                break
            out.extend(sample_digests(b, MODALITIES))
    return out


@pytest.mark.parametrize(
    ("old", "new", "shuffle"),
    [
        ((2, 0, 8, 2), (1, 0, 8), 16),   # 2 ranks -> 1, shuffled
        ((1, 0, 8, 3), (2, 0, 8), 16),   # 1 rank -> 2
        ((2, 2, 4, 3), (3, 1, 4), 0),    # 2 ranks x 2 workers -> 3 ranks x 1 worker, manifest order
        ((1, 2, 8, 1), (2, 2, 4), 8),    # batch size and workers change too
    ],
)
def test_rest_of_epoch_is_read_once(data, old, new, shuffle):
    world, workers, batch, consumed = old
    full = _read(data, world=world, workers=workers, batch=batch, shuffle=shuffle)
    assert len(full) == len(set(full))
    first = _read(data, world=world, workers=workers, batch=batch, shuffle=shuffle, take=consumed)
    segment = {"world_size": world, "num_workers": workers, "batch_size": batch, "batches": consumed}
    m_world, m_workers, m_batch = new
    rest = _read(data, world=m_world, workers=m_workers, batch=m_batch, shuffle=shuffle, segments=(segment,))
    seen = first + rest
    assert len(seen) == len(set(seen)), "a sample was read twice in the epoch"
    assert set(seen) <= set(full), "a sample outside the uninterrupted epoch was read"
    plan = make_loader(data, batch_size=m_batch, num_workers=m_workers, shuffle_buffer=shuffle, seed=SEED,
                       epoch=EPOCH, rank=0, world_size=m_world, segments=(segment,)).plan
    per_rank, left, dropped = remainder_size(plan, (segment,))
    assert left == len(full) - len(first)
    assert len(set(full) - set(seen)) == dropped < m_world * m_batch
    assert len(rest) == per_rank * m_world * m_batch


def test_second_interruption_chains_and_a_same_size_resume_skips(data):
    """2 ranks read 1 batch each, 1 rank then reads 2 of the re-planned rest, 2 ranks of 4 read the rest of
    that; and a resume of the 1-rank segment at the same size (skip_batches) reads what it would have."""
    full = _read(data, world=2, workers=0, batch=8, shuffle=16)
    s1 = {"world_size": 2, "num_workers": 0, "batch_size": 8, "batches": 1}
    s2 = {"world_size": 1, "num_workers": 0, "batch_size": 8, "batches": 2}
    first = _read(data, world=2, workers=0, batch=8, shuffle=16, take=1)
    second = _read(data, world=1, workers=0, batch=8, shuffle=16, segments=(s1,), take=2)
    after_skip = _read(data, world=1, workers=0, batch=8, shuffle=16, segments=(s1,), skip=2)
    whole = _read(data, world=1, workers=0, batch=8, shuffle=16, segments=(s1,))
    assert second + after_skip == whole  # exact resume inside a re-planned epoch
    third = _read(data, world=2, workers=0, batch=4, shuffle=16, segments=(s1, s2))
    seen = first + second + third
    assert len(seen) == len(set(seen)) and set(seen) <= set(full)
    assert len(set(full) - set(seen)) < 2 * 4


def test_segment_that_does_not_fit_is_refused(data):
    segment = {"world_size": 2, "num_workers": 0, "batch_size": 8, "batches": 99}
    with pytest.raises(ValueError, match="99 batches consumed"):
        make_loader(data, batch_size=8, num_workers=0, seed=SEED, rank=0, world_size=1, segments=(segment,))
