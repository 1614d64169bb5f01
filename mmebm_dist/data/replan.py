"""The rest of an interrupted epoch, re-planned over a new number of ranks, workers or batch size (elastic
resume).

An epoch's plan (:mod:`mmebm_dist.data.stream`) fixes which samples each (rank, worker) stream yields and in
which order; a checkpoint records how many batches every rank had consumed. Replaying that plan over sample
*indices* -- (shard, sample-in-shard) pairs; no shard is read, because a shuffle buffer's choices depend on
its seeded rng alone -- gives exactly the samples the uninterrupted epoch would still have read. That pool
is sorted by shard and cut into equal per-rank blocks of whole batches for the new world (``rank r`` takes
block r; inside it each worker a contiguous run of whole batches, read shard by shard through the worker's
seeded shuffle buffer), so each sample of the epoch is read once. The fewer than ``ranks x batch_size``
samples that do not fill a batch on every rank are left out (as ``drop_last`` leaves out each worker's
partial batch) and counted. A second interruption inside the re-planned epoch chains: an epoch's
``segments`` list, oldest first, ``{"world_size", "num_workers", "batch_size", "batches"}`` (batches every
rank consumed in it). Exact as long as nothing was skipped (``data.on_error=skip``) in the epoch before the
resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from mmebm_dist.data.stream import (
    StreamPlan,
    _worker_batches,
    batches_every_rank,
    replay_round_robin,
    shuffle_samples,
    worker_shards,
)

Key = tuple[int, int]
"""A sample: (shard index in the split, sample index in the shard)."""
SEGMENT_KEYS = ("world_size", "num_workers", "batch_size", "batches")


def sample_order(plan: StreamPlan, worker: int) -> list[Key]:
    """The samples worker ``worker`` of ``plan``'s rank yields, in order, before batching (finite plans with
    the manifest's counts)."""
    if plan.select is not None:
        items = list(plan.select[worker])
    else:
        items = [(shard, i) for shard in worker_shards(plan, worker) for i in range(plan.counts[shard])]
    if plan.shuffle_buffer > 0:
        items = list(shuffle_samples(plan, worker, iter(items)))
    return items


def split_pool(pool: Sequence[Key], rank: int, world_size: int, workers: int,
               batch_size: int) -> tuple[tuple[Key, ...], ...]:
    """Rank ``rank``'s block of the sorted ``pool`` in whole batches (the same count on every rank), cut into
    one contiguous run per worker: worker w gets as many batches as the DataLoader's round-robin takes from
    it (batches w, w + workers, ... of the rank's count)."""
    per_rank = len(pool) // (world_size * batch_size)
    block = pool[rank * per_rank * batch_size : (rank + 1) * per_rank * batch_size]
    out, start = [], 0
    for worker in range(workers):
        n = len(range(worker, per_rank, workers)) * batch_size
        out.append(tuple(block[start : start + n]))
        start += n
    return tuple(out)


def _segment_plan(base: StreamPlan, segment: dict, rank: int, pool: list[Key] | None) -> StreamPlan:
    plan = replace(base, rank=rank, world_size=segment["world_size"], num_workers=segment["num_workers"],
                   batch_size=segment["batch_size"], skip=(), pad=(), select=None, epoch_length=None)
    if pool is None:
        return plan
    return replace(plan, select=split_pool(pool, rank, plan.world_size, plan.workers, plan.batch_size))


def _remaining_after(base: StreamPlan, segment: dict, pool: list[Key] | None) -> list[Key]:
    """The samples of ``pool`` (None: the whole epoch) that ``segment``'s ranks had not read after its
    ``batches`` each but would have read by the end of the epoch; sorted."""
    world, batch = segment["world_size"], segment["batch_size"]
    if pool is None:
        end = batches_every_rank(base.counts, batch_size=batch, world_size=world,
                                 num_workers=segment["num_workers"])
    else:
        end = len(pool) // (world * batch)
    if not 0 <= segment["batches"] <= end:
        raise ValueError(f"epoch segment {segment}: {segment['batches']} batches consumed, but each rank "
                         f"had {end} in that part of the epoch; the checkpoint's epoch_segments do not fit "
                         "the data")
    rest: list[Key] = []
    for rank in range(world):
        plan = _segment_plan(base, segment, rank, pool)
        counts = [_worker_batches(plan, w) for w in range(plan.workers)]
        done, _ = replay_round_robin(counts, segment["batches"])
        total, _ = replay_round_robin(counts, end)
        for worker in range(plan.workers):
            rest.extend(sample_order(plan, worker)[done[worker] * batch : total[worker] * batch])
    return sorted(rest)


def remaining_pool(base: StreamPlan, segments: Sequence[dict]) -> list[Key]:
    """The samples of ``base``'s epoch left after ``segments`` (oldest first), sorted."""
    if base.counts is None or base.resampled:
        raise ValueError("re-planning the rest of an epoch needs the manifest's shard counts (a dataset "
                         "directory, not bare shard URLs) and a finite stream (not resampled)")
    pool = None
    for segment in segments:
        missing = [k for k in SEGMENT_KEYS if k not in segment]
        if missing:
            raise ValueError(f"epoch segment {segment} lacks {missing}")
        pool = _remaining_after(base, segment, pool)
    return pool if pool is not None else []


def remainder_plan(plan: StreamPlan, segments: Sequence[dict]) -> StreamPlan:
    """``plan`` (this rank's plan of the epoch at the new world size) reading its share of what
    ``segments`` left of the epoch."""
    pool = remaining_pool(plan, segments)
    return replace(plan, select=split_pool(pool, plan.rank, plan.world_size, plan.workers, plan.batch_size))


def remainder_size(plan: StreamPlan, segments: Sequence[dict]) -> tuple[int, int, int]:
    """(batches per rank, samples left in the epoch, samples left out) of the re-planned rest."""
    pool = remaining_pool(plan, segments)
    per_rank = len(pool) // (plan.world_size * plan.batch_size)
    return per_rank, len(pool), len(pool) - per_rank * plan.world_size * plan.batch_size
