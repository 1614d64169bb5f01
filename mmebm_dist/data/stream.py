"""Streaming loader over webdataset shards, split by rank then by DataLoader worker, with exact resume.

Plan of one epoch (all of it follows from the manifest and (seed, epoch, rank, world_size, num_workers)):
- Shards are split as webdataset's ``split_by_node`` then ``split_by_worker`` do, from the real rank: rank r
  takes shards r, r + W, ... of the epoch's shard order; its worker w takes every num_workers-th of those.
  Ranks therefore read disjoint shards. The epoch's shard order is the manifest's when not shuffling; with
  ``shuffle_buffer > 0`` it is a permutation seeded by (seed, epoch), the same on every rank, so shards move
  between ranks from epoch to epoch. webdataset splits shards, not samples: for balance, make the shard count
  a multiple of ranks x workers (the builder's default 500-sample shards give 120 train shards).
- With ``shuffle_buffer > 0`` each worker permutes its shards per epoch and shuffles samples in a buffer of
  that size, seeded by (seed, epoch, rank, worker); with 0 the order is the manifest's.
- Each worker batches its own samples; the DataLoader interleaves workers round-robin. With ``drop_last`` (the
  default for the train split) each worker drops its final partial batch, so ``epoch_batches`` can compute,
  from the manifest alone, how many full batches every rank yields in any epoch; other splits keep partial
  batches. ``epoch_length`` makes a loader yield exactly that many: under ``on_error='skip'`` a rank whose
  stream came up short (skipped samples) starts its epoch's stream again to fill the gap, so ranks stay in
  step. A resume into an epoch is exact when nothing was skipped before the resume point in that epoch.
- ``skip_batches=k`` replays the round-robin to find how many samples each worker had consumed after k
  batches, drops them before decoding (whole shards unread when not shuffling), and pads the first round
  with placeholders so that the interleaving continues exactly where it stopped.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import groupby, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from einops import rearrange
from PIL import Image

from mmebm_dist.data.codec import FormatError, check_png_size, is_http, read_shard
from mmebm_dist.data.shards import (
    ENCODINGS,
    IMAGE_ENCODINGS,
    LABEL_EXT,
    ModalitySpec,
    ShardError,
    check_raw,
    decode_entry,
    is_incomplete,
    manifest_dict_hash,
    manifest_path,
    manifest_url,
    modality_specs,
    parse_label,
    read_manifest,
    sample_presence,
    shard_location,
    split_shards,
)

logger = logging.getLogger("mmebm_dist.data")

ON_ERROR = ("raise", "skip")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
Batch = dict[str, torch.Tensor]


# -------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True, kw_only=True)
class StreamPlan:
    """All a worker needs to reproduce its part of the stream (picklable: sent to DataLoader workers)."""

    urls: tuple[str, ...]
    """Shard URLs of the split, in manifest (or given) order."""
    counts: tuple[int, ...] | None
    """Samples per shard from the manifest; None for bare URLs."""
    sizes: tuple[int | None, ...] | None = None
    """Bytes per shard from the manifest (checked before or while reading); None for bare URLs."""
    sha256s: tuple[str, ...] | None = None
    """sha256 per shard to check while reading (``check_sha256``); None: not checked."""
    modalities: tuple[ModalitySpec, ...] | None
    """The manifest's modalities; None for bare URLs (then read off the first sample)."""
    incomplete: bool = False
    """The manifest says tuples may lack modalities: batches carry ``present`` [B, M] bool."""
    batch_size: int
    num_workers: int
    shuffle_buffer: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    resampled: bool
    on_error: str
    drop_last: bool
    epoch_length: int | None = None
    """Batches the loader yields in this epoch, refilling short streams under on_error='skip'."""
    skip: tuple[int, ...] = ()
    """Samples each worker drops before decoding (exact resume)."""
    pad: tuple[bool, ...] = ()
    """Whether each worker first emits a placeholder to realign the round-robin after a resume."""
    select: tuple[tuple[tuple[int, int], ...], ...] | None = None
    """Per worker, the (shard, sample-in-shard) indices it reads, shard by shard, instead of its shards: the
    rest of an epoch re-planned over new ranks (:mod:`mmebm_dist.data.replan`); None: the rank's shards."""

    @property
    def workers(self) -> int:
        """Data-producing streams per rank (num_workers=0 runs one stream in the main process)."""
        return max(1, self.num_workers)


def node_split(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The items rank ``rank`` reads: webdataset's split_by_node (islice(rank, None, world_size))."""
    return list(islice(items, rank, None, world_size))


def worker_split(items: Sequence[Any], worker: int, num_workers: int) -> list[Any]:
    """The items worker ``worker`` reads: webdataset's split_by_worker."""
    return list(islice(items, worker, None, max(1, num_workers)))


def _rng(plan: StreamPlan, worker: int, purpose: int) -> random.Random:
    seq = np.random.SeedSequence(
        [plan.seed, plan.epoch, plan.rank, plan.world_size, worker, plan.workers, purpose]
    )
    return random.Random(int(seq.generate_state(2, dtype=np.uint64)[0]))


def epoch_shards(plan: StreamPlan) -> list[int]:
    """The epoch's shard order that ranks split: the manifest's, or with shuffling a permutation seeded by
    (seed, epoch) alone, identical on every rank, so each shard still goes to exactly one rank."""
    order = list(range(len(plan.urls)))
    if plan.shuffle_buffer > 0:
        seq = np.random.SeedSequence([plan.seed, plan.epoch, len(order), 3])
        random.Random(int(seq.generate_state(2, dtype=np.uint64)[0])).shuffle(order)
    return order


def worker_shards(plan: StreamPlan, worker: int) -> list[int]:
    """Shard indices worker ``worker`` of this rank reads in this epoch, in reading order (finite plans)."""
    mine = worker_split(node_split(epoch_shards(plan), plan.rank, plan.world_size), worker, plan.workers)
    if plan.shuffle_buffer > 0:
        _rng(plan, worker, 0).shuffle(mine)
    return mine


def _worker_batches(plan: StreamPlan, worker: int) -> int | None:
    """Batches a worker yields in one epoch (None: unknown without counts, or infinite when resampled)."""
    if plan.select is not None:
        return len(plan.select[worker]) // plan.batch_size  # re-planned blocks are whole batches
    if plan.resampled or plan.counts is None:
        return None
    n = sum(plan.counts[i] for i in worker_shards(plan, worker))
    return n // plan.batch_size if plan.drop_last else -(-n // plan.batch_size)


def replay_round_robin(batches: Sequence[int | None], k: int) -> tuple[list[int], list[bool]]:
    """Batches consumed per worker after the first k of a round-robin, and which workers pad the next round.

    ``batches[w]`` is worker w's batch count (None = unbounded). Workers take turns in index order and drop
    out when exhausted, as torch's DataLoader interleaves IterableDataset workers.
    """
    consumed = [0] * len(batches)
    pad = [False] * len(batches)
    done, t = 0, 0
    while done < k:
        active = [w for w, b in enumerate(batches) if b is None or b > t]
        if not active:
            break
        finite = [batches[w] for w in active if batches[w] is not None]
        until_change = (min(finite) - t) if finite else None
        rounds = (k - done) // len(active)
        if until_change is not None:
            rounds = min(rounds, until_change)
        if rounds > 0:
            for w in active:
                consumed[w] += rounds
            done += rounds * len(active)
            t += rounds
            continue
        for w in active[: k - done]:
            consumed[w] += 1
            pad[w] = True
        done = k
    return consumed, pad


# ----------------------------------------------------------------------------------------------- worker side


@dataclass
class _WorkerState:
    plan: StreamPlan
    worker: int
    skipped: int = 0
    specs: tuple[ModalitySpec, ...] | None = field(default=None)

    def fail(self, message: str, exc: BaseException | None = None) -> None:
        """Raise (on_error='raise') or log and count the skip (on_error='skip')."""
        if self.plan.on_error == "raise":
            raise ShardError(message) from exc
        self.skipped += 1
        logger.warning("rank %d worker %d: skipping: %s", self.plan.rank, self.worker, message)


def _shard_samples(state: _WorkerState, index: int, drop: int) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) samples of shard ``index`` minus the first ``drop``; errors name shard and key.

    The manifest's byte size (and sha256 when asked) are checked as the shard is read."""
    plan = state.plan
    url = plan.urls[index]
    expected = plan.counts[index] if plan.counts is not None else None
    size = plan.sizes[index] if plan.sizes is not None else None
    sha256 = plan.sha256s[index] if plan.sha256s is not None else None
    n, key = 0, None
    try:
        for sample in read_shard(url, size=size, sha256=sha256):
            key = sample["__key__"]
            n += 1
            if n > drop:
                yield sample
    except (OSError, ValueError) as exc:  # FormatError is a ValueError
        done = f" after {n} samples (last key {key!r})" if n else ""
        state.fail(f"shard {url}: unreadable{done}: {type(exc).__name__}: {exc}", exc)
        return
    if expected is not None and n != expected:
        state.fail(
            f"shard {url}: {n} samples, the manifest says {expected} (last key {key!r}); "
            "run `mmebm data verify`"
        )


def _raw_stream(state: _WorkerState) -> Iterator[dict[str, Any]]:
    """This worker's raw samples: its shards (or resampled draws), shuffled if asked, resume skip applied."""
    plan, worker = state.plan, state.worker
    drop = plan.skip[worker] if plan.skip else 0
    if plan.select is not None:
        samples = _selected(state, plan.select[worker])
        if plan.shuffle_buffer > 0:
            samples = shuffle_samples(plan, worker, samples)
        yield from islice(samples, drop, None)
        return
    if plan.resampled:
        rng = _rng(plan, worker, 1)
        shard_ids: Iterator[int] = iter(lambda: rng.randrange(len(plan.urls)), -1)
    else:
        shard_ids = iter(worker_shards(plan, worker))
    if plan.shuffle_buffer > 0:
        yield from islice(shuffle_samples(plan, worker, _chain(state, shard_ids, 0)), drop, None)
    else:
        yield from _chain(state, shard_ids, drop)


def shuffle_samples(plan: StreamPlan, worker: int, samples: Iterator[Any]) -> Iterator[Any]:
    """A worker's shuffle buffer (seeded by the plan and worker). Its choices depend on the seeded rng
    alone, never on the samples, so replaying it over sample indices gives the order of the real stream."""
    return wds.filters.shuffle(plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=_rng(plan, worker, 2))(
        samples
    )


def _selected(state: _WorkerState, keys: Sequence[tuple[int, int]]) -> Iterator[dict[str, Any]]:
    """The samples ``keys`` names ((shard, sample-in-shard), grouped by shard, ascending), each shard read
    once up to its last wanted sample."""
    for shard, group in groupby(keys, key=lambda key: key[0]):
        wanted = {index for _, index in group}
        last = max(wanted)
        for n, sample in enumerate(_shard_samples(state, shard, 0)):
            if n in wanted:
                yield sample
            if n == last:
                break


def _chain(state: _WorkerState, shard_ids: Iterator[int], drop: int) -> Iterator[dict[str, Any]]:
    """Samples of the given shards in order, minus the first ``drop``.

    With known counts whole shards are left unread, so a resume costs no decoding and little I/O.
    """
    plan = state.plan
    if plan.counts is None:
        samples = (s for i in shard_ids for s in _shard_samples(state, i, 0))
        yield from islice(samples, drop, None)
        return
    for i in shard_ids:
        expected = plan.counts[i]
        if drop >= expected:
            drop -= expected
            continue
        yield from _shard_samples(state, i, drop)
        drop = 0


def _infer_specs(sample: dict[str, Any]) -> tuple[ModalitySpec, ...]:
    """Modalities of a bare-URL stream: each ``*.png`` / ``*.npy`` entry of the first sample, as decoded."""
    specs = []
    for entry in sorted(k for k in sample if k.rpartition(".")[2] in ENCODINGS and not k.startswith("__")):
        name, _, encoding = entry.rpartition(".")
        if encoding == "raw":
            raise ShardError(
                f"shard {sample.get('__url__')}: entry {entry!r} is raw bytes, whose shape only a manifest "
                "gives: pass the data set directory or manifest URL instead of shard URLs"
            )
        if encoding == "png":
            try:
                check_png_size(sample[entry])  # before PIL reads more than the header
            except FormatError as exc:
                raise ShardError(f"{_where(sample)} entry {entry!r}: {exc}") from None
            with Image.open(io.BytesIO(sample[entry])) as img:
                spec = ModalitySpec(name, encoding, (len(img.getbands()), img.height, img.width), "uint8")
        else:
            arr = np.load(io.BytesIO(sample[entry]), allow_pickle=False)
            spec = ModalitySpec(name, encoding, tuple(arr.shape), str(arr.dtype))
        specs.append(spec)
    if not specs:
        raise ShardError(
            f"shard {sample.get('__url__')}: sample {sample.get('__key__')!r} has no .png/.npy modality"
        )
    return tuple(specs)


Row = tuple[list[Any], int, list[bool] | None]
"""A decoded sample: arrays per modality (None: absent), label, presence (incomplete sets only)."""


def _where(sample: dict[str, Any]) -> str:
    return f"shard {sample.get('__url__')}: sample {sample.get('__key__')!r}"


def _presence(state: _WorkerState, sample: dict[str, Any]) -> list[bool] | None:
    """The modalities an incomplete set's sample holds; None: skipped (it holds none, or a bad mask)."""
    try:
        held = sample_presence(state.specs, sample)
    except ValueError as exc:
        state.fail(f"{_where(sample)}: {exc}", exc)
        return None
    if not any(held):
        entries = sorted(k for k in sample if not k.startswith("__"))
        state.fail(f"{_where(sample)} holds no modality (has {entries})")
        return None
    return held


def _decode(state: _WorkerState, sample: dict[str, Any]) -> Row | None:
    """Decoded arrays per modality (raw: the sample's checked record, sliced per batch; None: absent), the
    label and (incomplete sets) the presence, or None when the sample is skipped."""
    if state.specs is None:
        state.specs = _infer_specs(sample)
    held = _presence(state, sample) if state.plan.incomplete else None
    if state.plan.incomplete and held is None:
        return None
    arrays: list[Any] = []
    record = None  # the raw record, looked up and checked once for all raw modalities
    for m, spec in enumerate(state.specs):
        if spec.encoding == "raw" and record is not None:
            arrays.append(record)
            continue
        data = sample.get(spec.entry)
        if held is not None and not held[m] and spec.encoding != "raw":
            arrays.append(None)  # absent: a zero placeholder in _collate
            continue
        if data is None:
            present = sorted(k for k in sample if not k.startswith("__"))
            state.fail(f"{_where(sample)} lacks modality {spec.name!r} (entry {spec.entry!r}; has {present})")
            return None
        try:
            if spec.encoding == "raw":
                record = data if len(data) == spec.record else check_raw(spec, data)
                arrays.append(record)
            else:
                arrays.append(decode_entry(spec, data))
        except (OSError, ValueError) as exc:
            state.fail(f"{_where(sample)} modality {spec.name!r}: {exc}", exc)
            return None
    label = parse_label(sample[LABEL_EXT]) if LABEL_EXT in sample else None
    if label is None:
        state.fail(f"{_where(sample)} lacks a valid label {LABEL_EXT!r}")
        return None
    return arrays, label, held


def _uint8_buffer(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An uninitialised uint8 tensor, allocated in shared memory when it will cross the worker queue: the
    DataLoader would otherwise copy it there when pickling (measured: 13 ms per 128-tuple batch of views)."""
    out = torch.empty(shape, dtype=torch.uint8)
    return out.share_memory_() if shared else out


def _placeholder(spec: ModalitySpec) -> np.ndarray:
    """Zeros standing in for an absent modality, shaped as its decoded entry (png: [H, W, C])."""
    shape = (*spec.shape[1:], spec.shape[0]) if spec.encoding == "png" else spec.shape
    return np.zeros(shape, dtype=np.uint8 if spec.encoding in IMAGE_ENCODINGS else spec.dtype)


def _collate(specs: tuple[ModalitySpec, ...], rows: list[Row], *, shared: bool = False) -> Batch:
    """{name: [B, *shape], 'label': int64 [B]}; images stay uint8 [B, C, H, W] (a quarter of float32's bytes
    through the worker queue and the host-to-device copy): :func:`images_to_float` converts them later.
    Incomplete sets add 'present': bool [B, M] (manifest order), absent modalities being zeros.
    ``shared``: image buffers in shared memory (for a DataLoader worker)."""
    batch: Batch = {}
    records = None  # (B, record bytes) uint8: the raw records of the batch, copied once into one buffer
    held = None if rows[0][2] is None else np.array([row[2] for row in rows], dtype=bool)  # (B, M)
    for m, spec in enumerate(specs):
        if spec.encoding == "raw":
            if records is None:
                records = _uint8_buffer((len(rows), spec.record), shared)
                view = memoryview(records.numpy()).cast("B")
                for i, (arrays, _, _) in enumerate(rows):
                    view[i * spec.record : (i + 1) * spec.record] = arrays[m]
            # a view: every raw modality of the batch shares the one buffer (one storage to hand over)
            image = records[:, spec.offset : spec.offset + spec.nbytes].unflatten(1, spec.shape)
            if held is not None and not held[:, m].all():
                image[torch.from_numpy(~held[:, m])] = 0  # absent: zeros, whatever the record held
            batch[spec.name] = image
            continue
        entries = [_placeholder(spec) if arrays[m] is None else arrays[m] for arrays, _, _ in rows]
        if spec.encoding == "png":  # decoded (H, W, C) per sample; batches are (B, C, H, W)
            c, h, w = spec.shape
            stacked = _uint8_buffer((len(rows), h, w, c), shared)
            np.stack(entries, out=stacked.numpy())
            batch[spec.name] = rearrange(stacked, "b h w c -> b c h w")
        else:
            batch[spec.name] = torch.from_numpy(np.stack(entries))
    batch["label"] = torch.tensor([label for _, label, _ in rows], dtype=torch.int64)
    if held is not None:
        batch["present"] = torch.from_numpy(held)
    return batch


def image_names(specs: Sequence[ModalitySpec]) -> tuple[str, ...]:
    """Names of the image modalities (png or raw): uint8 in the worker, float32 in [0, 1] for the model."""
    return tuple(spec.name for spec in specs if spec.encoding in IMAGE_ENCODINGS)


def images_to_float(batch: Batch, images: Sequence[str], *, pin_memory: bool = False) -> Batch:
    """``batch`` with the uint8 images ``images`` as float32 [B, C, H, W] in [0, 1] (contiguous; in
    page-locked memory with ``pin_memory``); on a CUDA tensor the division runs on the device."""
    out = dict(batch)
    for name in images:
        image = batch[name]
        if image.is_cuda:
            out[name] = image.to(torch.float32).div_(255.0)
            continue
        result = torch.empty(image.shape, dtype=torch.float32, pin_memory=pin_memory)
        # numpy, not torch: torch's intra-op threads slowed this 50x on a busy 2-core machine (measured).
        np.divide(image.numpy(), np.float32(255.0), out=result.numpy())
        out[name] = result
    return out


def worker_stream(
    plan: StreamPlan, worker: int, *, shared: bool = False
) -> Iterator[tuple[int, Batch | None, int, tuple[str, ...]]]:
    """(worker, batch or None, skips so far, image names) items of one worker: a placeholder first if the
    resume needs it, then its batches, then a final (worker, None, skips, ...) so the main process learns the
    last skip count. Batches hold uint8 images (see :func:`_collate`), in shared memory with ``shared``."""
    state = _WorkerState(plan=plan, worker=worker, specs=plan.modalities)
    if plan.pad and plan.pad[worker]:
        yield worker, None, 0, ()
    rows: list[Row] = []
    for sample in _raw_stream(state):
        decoded = _decode(state, sample)
        if decoded is None:
            continue
        rows.append(decoded)
        if len(rows) == plan.batch_size:
            yield worker, _collate(state.specs, rows, shared=shared), state.skipped, image_names(state.specs)
            rows = []
    if rows and not plan.drop_last:
        yield worker, _collate(state.specs, rows, shared=shared), state.skipped, image_names(state.specs)
    yield worker, None, state.skipped, ()


class _WorkerDataset(torch.utils.data.IterableDataset):
    """Runs ``worker_stream`` for the DataLoader worker it lands in."""

    def __init__(self, plan: StreamPlan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[int, Batch | None, int, tuple[str, ...]]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        return worker_stream(self.plan, worker, shared=info is not None)


# ------------------------------------------------------------------------------------------------- main side


class ShardLoader:
    """Iterable of batches for one rank; ``skipped`` counts samples/shards skipped under on_error='skip'.

    With ``pin_memory`` the batches land in page-locked memory (for non-blocking host-to-device copies).
    With ``float_images`` (default) images arrive as float32 in [0, 1], converted in this process after the
    worker hand-off; without, they stay uint8 and the consumer converts them (:func:`images_to_float` with
    ``loader.images``, e.g. on the GPU after a copy of a quarter of the bytes)."""

    def __init__(self, plan: StreamPlan, *, pin_memory: bool = False, float_images: bool = True) -> None:
        self.plan = plan
        self.pin_memory = pin_memory
        self.float_images = float_images
        self.skipped = 0
        self.images: tuple[str, ...] = image_names(plan.modalities or ())
        """Names of the image modalities (known after the first batch for bare shard URLs)."""

    def _deliver(self, batch: Batch, images: tuple[str, ...]) -> Batch:
        """A worker's batch as this loader hands it out: images converted or not, pinned if asked."""
        self.images = images = tuple(images)  # the DataLoader's convert turns tuples into lists
        if self.float_images:
            batch = images_to_float(batch, images, pin_memory=self.pin_memory)
        if self.pin_memory:
            batch = {k: v if v.is_pinned() else v.contiguous().pin_memory() for k, v in batch.items()}
        return batch

    def __len__(self) -> int:
        """Batches this rank yields in the epoch (finite plans with a manifest only)."""
        consumed = sum(self.plan.skip) // self.plan.batch_size if self.plan.skip else 0
        if self.plan.epoch_length is not None:
            return max(0, self.plan.epoch_length - consumed)
        counts = [_worker_batches(self.plan, w) for w in range(self.plan.workers)]
        if any(c is None for c in counts):
            raise TypeError("length unknown: resampled stream or shard URLs without a manifest")
        consumed = (
            sum(self.plan.skip[w] // self.plan.batch_size for w in range(len(counts)))
            if self.plan.skip
            else 0
        )
        return sum(counts) - consumed

    def _pass(self, plan: StreamPlan, before: int) -> Iterator[Batch]:
        """One pass over ``plan``'s stream; ``self.skipped`` = ``before`` + the skips of this pass so far."""
        per_worker = [0] * plan.workers
        if plan.num_workers == 0:
            items: Any = worker_stream(plan, 0)
        else:
            items = torch.utils.data.DataLoader(
                _WorkerDataset(plan),
                batch_size=None,
                num_workers=plan.num_workers,
                prefetch_factor=4,
            )
        for worker, batch, skipped, images in items:
            per_worker[int(worker)] = int(skipped)
            self.skipped = before + sum(per_worker)
            if batch is not None:
                yield self._deliver(batch, images)

    def __iter__(self) -> Iterator[Batch]:
        self.skipped = 0
        plan, wanted = self.plan, None
        if plan.epoch_length is not None:
            wanted = len(self)
        yielded = 0
        for batch in self._pass(plan, 0):
            if yielded == wanted:
                return
            yield batch
            yielded += 1
        if wanted is None or yielded == wanted:
            return
        where = f"rank {plan.rank}, epoch {plan.epoch}"
        if plan.on_error == "raise":
            raise ShardError(
                f"{where}: the stream ended after {yielded} of the {wanted} batches its manifest promises; "
                "check the shards (`mmebm data verify`)"
            )
        refill = replace(plan, skip=(), pad=())  # the epoch's stream again, from its start
        while yielded < wanted:
            logger.warning(
                "%s: %d samples skipped so far, the stream ended %d batches short: refilling from the "
                "start of the epoch's stream", where, self.skipped, wanted - yielded,
            )
            before, got = self.skipped, 0
            for batch in self._pass(refill, before):
                if yielded == wanted:
                    return
                yield batch
                yielded, got = yielded + 1, got + 1
            if got == 0:
                raise ShardError(f"{where}: every sample of this rank's shards was skipped; see the log")


class SkipTally:
    """Samples/shards skipped under on_error='skip' by one rank's successive loaders (one per epoch), summed:
    what the training loop logs as ``data_skipped``."""

    def __init__(self) -> None:
        self.finished = 0
        self.loader: ShardLoader | None = None

    def track(self, loader: ShardLoader) -> ShardLoader:
        """Count ``loader``'s skips from now on (the previous loader's count is kept)."""
        if self.loader is not None:
            self.finished += self.loader.skipped
        self.loader = loader
        return loader

    @property
    def total(self) -> int:
        """Skips so far, the current loader's included."""
        return self.finished + (self.loader.skipped if self.loader is not None else 0)


def to_device(item: Any, device: torch.device, *, non_blocking: bool = True) -> Any:
    """``item`` (tensors, nested in dicts, tuples and lists) with every tensor moved to ``device``."""
    if torch.is_tensor(item):
        return item.to(device, non_blocking=non_blocking)
    if isinstance(item, dict):
        return {k: to_device(v, device, non_blocking=non_blocking) for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return type(item)(to_device(v, device, non_blocking=non_blocking) for v in item)
    return item


def _tensors(item: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(item):
        yield item
    elif isinstance(item, dict):
        for v in item.values():
            yield from _tensors(v)
    elif isinstance(item, (tuple, list)):
        for v in item:
            yield from _tensors(v)


def prefetch_to_device(items: Iterator[Any], device: torch.device) -> Iterator[Any]:
    """``items`` with their tensors on ``device``. On CUDA the copy of the next item is issued on a side
    stream (non-blocking, from pinned memory) before the current item is handed out, so the host-to-device
    copy overlaps the step; on other devices the items pass through unchanged (no copy on CPU)."""
    if device.type != "cuda":
        yield from items
        return
    copy_stream = torch.cuda.Stream(device)

    def issue(item: Any) -> Any:
        with torch.cuda.stream(copy_stream):
            return to_device(item, device)

    pending = next(items, None)
    pending = None if pending is None else issue(pending)
    while pending is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)
        for t in _tensors(pending):
            t.record_stream(compute)  # the caching allocator must not reuse them before the step ends
        current = pending
        following = next(items, None)
        pending = None if following is None else issue(following)
        yield current


def _default_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    return rank, world_size


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """A data set resolved once: where a split's shards are and what the manifest says of them (None fields:
    bare URLs). Built by :func:`resolve_source`; :func:`make_loader`, :func:`epoch_batches` and
    :func:`rank_batches` take it in place of a path, so a run reads (over HTTP: fetches) its manifest once."""

    path: str
    """The data set as given (for messages)."""
    split: str
    urls: tuple[str, ...]
    """Shard URLs of the split, in manifest (or given) order (``shard_url`` applied)."""
    counts: tuple[int, ...] | None
    """Samples per shard."""
    specs: tuple[ModalitySpec, ...] | None
    """The manifest's modalities."""
    sizes: tuple[int | None, ...] | None
    """Bytes per shard."""
    sha256s: tuple[str, ...] | None
    """sha256 per shard."""
    incomplete: bool = False
    """The manifest says tuples may lack modalities."""
    manifest: dict[str, Any] | None = None
    """The checked manifest (:func:`mmebm_dist.data.shards.read_manifest`)."""

    @property
    def manifest_hash(self) -> str:
        """:func:`mmebm_dist.data.shards.manifest_hash` of the manifest (ShardError for bare URLs)."""
        if self.manifest is None:
            where = manifest_url(self.path) if is_http(self.path) else manifest_path(self.path)
            raise ShardError(f"no manifest at {where}: a run reads a data set written by `mmebm data` (its "
                             "directory, manifest file or manifest URL), not bare shard URLs")
        return manifest_dict_hash(self.manifest)


def resolve_source(path: str | Path | Sequence[str] | DataSource, split: str = "train",
                   shard_url: str | None = None) -> DataSource:
    """Shards of ``split`` from a data set directory / manifest file / http(s) manifest URL, or bare URLs
    (a :class:`DataSource` is returned as it is, after checking its split).

    An http(s) ``path`` not ending in a shard suffix and without braces is a data set URL (its manifest is
    ``path/manifest.json`` or ``path`` itself when it ends in ``.json``). Shard names from a manifest are
    plain relative paths (``read_manifest`` checks), placed under the manifest's directory or URL; only URLs
    the user passes directly (``pipe:``, brace patterns, a list, or ``shard_url``: a template in which
    ``{name}`` stands for each manifest shard's name) are opened as given."""
    if isinstance(path, DataSource):
        if path.split != split or shard_url is not None:
            raise ValueError(f"the data source of {path.path} holds split {path.split!r}, asked for {split!r}"
                             f"{' with shard_url ' + repr(shard_url) if shard_url is not None else ''}: "
                             "resolve_source the split (and shard_url) it is read with")
        return path
    remote = isinstance(path, str) and is_http(path) and "{" not in path and not path.endswith(SHARD_SUFFIXES)
    if remote or (isinstance(path, (str, Path)) and manifest_path(path).is_file()):
        manifest = read_manifest(path)
        if manifest["layout"] != "shards":
            raise ShardError(
                f"{path}: layout {manifest['layout']!r}; the loader reads webdataset shards "
                "(rebuild with --format shards)"
            )
        entries = split_shards(manifest, split)
        if not entries:
            raise ShardError(f"{path}: split {split!r} has no shards")
        if shard_url is not None and "{name}" not in shard_url:
            raise ValueError(f"shard_url {shard_url!r} lacks '{{name}}' (where each shard's name goes)")
        return DataSource(
            path=str(path),
            split=split,
            urls=tuple(
                shard_url.replace("{name}", e["name"])
                if shard_url is not None
                else shard_location(str(path) if remote else path, e["name"])
                for e in entries
            ),
            counts=tuple(int(e["count"]) for e in entries),
            specs=tuple(modality_specs(manifest)),
            sizes=tuple(e.get("bytes") for e in entries),
            sha256s=tuple(e["sha256"] for e in entries),
            incomplete=is_incomplete(manifest),
            manifest=manifest,
        )
    if shard_url is not None:
        raise ShardError(f"shard_url needs a manifest, and {path} has none")
    if isinstance(path, Path) or (isinstance(path, str) and Path(path).is_dir()):
        raise ShardError(
            f"no manifest at {manifest_path(path)}: build the data with `mmebm data polymnist`, "
            "or pass shard URLs"
        )
    urls = tuple(wds.shardlists.expand_urls(path)) if isinstance(path, str) else tuple(str(u) for u in path)
    if not urls:
        raise ShardError(f"no shard URLs in {path!r}")
    return DataSource(path=str(path), split=split, urls=urls, counts=None, specs=None, sizes=None,
                      sha256s=None)


def make_loader(
    path: str | Path | Sequence[str] | DataSource,
    *,
    batch_size: int,
    num_workers: int = 1,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    split: str = "train",
    resampled: bool = False,
    on_error: str = "raise",
    skip_batches: int = 0,
    drop_last: bool | None = None,
    epoch_length: int | None = None,
    check_sha256: bool = False,
    pin_memory: bool = False,
    shard_url: str | None = None,
    float_images: bool = True,
    segments: Sequence[dict] = (),
) -> ShardLoader:
    """Batches ``{name: float32 [B, C, H, W] in [0, 1], 'label': int64 [B]}`` streamed from webdataset shards.

    ``path``: a directory (or manifest.json, or the http(s) URL of one) written by ``mmebm data``, or shard
    URLs given explicitly (brace patterns, ``pipe:`` commands, a list), or a :class:`DataSource` of ``split``
    (then read as resolved: no manifest read). ``drop_last`` (default: True for the
    train split only) drops each worker's final partial batch. ``skip_batches=k`` yields exactly what the
    loader yields after its first k batches. ``resampled`` draws shards with replacement forever.
    ``on_error='skip'`` logs and counts bad shards/samples (``loader.skipped``) instead of raising.
    ``shard_url``: read each manifest shard from this template instead (``{name}`` = the shard's name; any
    scheme, e.g. ``pipe:`` for an object store's CLI).
    ``epoch_length``: yield exactly that many batches (see the module docstring). Shard byte sizes from the
    manifest are always checked, sha256 with ``check_sha256``. ``pin_memory``: batches in page-locked memory.
    ``float_images=False``: images stay uint8 [B, C, H, W]; convert with ``images_to_float(batch,
    loader.images)`` where it is cheapest (on the GPU after the copy).
    ``segments``: the parts of this epoch already read under other ranks/workers/batch sizes
    (:func:`mmebm_dist.data.replan.remainder_plan`); the loader then reads this rank's share of the rest.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0 or shuffle_buffer < 0 or skip_batches < 0:
        raise ValueError(
            f"num_workers ({num_workers}), shuffle_buffer ({shuffle_buffer}) and skip_batches "
            f"({skip_batches}) must be >= 0"
        )
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: choose one of {ON_ERROR}")
    rank, world_size = _default_rank(rank, world_size)
    where = resolve_source(path, split, shard_url)
    plan = StreamPlan(
        urls=where.urls,
        counts=where.counts,
        sizes=where.sizes,
        sha256s=where.sha256s if check_sha256 else None,
        modalities=where.specs,
        incomplete=where.incomplete,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        resampled=resampled,
        on_error=on_error,
        drop_last=(split == "train") if drop_last is None else drop_last,
        epoch_length=epoch_length,
    )
    if segments:
        from mmebm_dist.data.replan import remainder_plan

        plan = remainder_plan(plan, segments)
    if skip_batches:
        batches = [_worker_batches(plan, w) for w in range(plan.workers)]
        if not plan.resampled and plan.counts is None and plan.workers > 1:
            raise ValueError(
                "skip_batches with several workers needs the manifest's shard counts: pass the "
                "dataset directory instead of bare shard URLs"
            )
        if plan.counts is None and not plan.resampled:
            batches = [None]
        consumed, pad = replay_round_robin(batches, skip_batches)
        plan = replace(plan, skip=tuple(c * batch_size for c in consumed), pad=tuple(pad))
    return ShardLoader(plan, pin_memory=pin_memory, float_images=float_images)


def rank_batches(
    path: str | Path | DataSource, *, batch_size: int, world_size: int, num_workers: int, split: str = "train"
) -> list[int]:
    """Full batches each rank yields in an epoch read in manifest order (drop_last), from the manifest."""
    where = resolve_source(path, split)
    if where.counts is None:
        raise ShardError(f"{where.path}: batch counts need a manifest (a dataset directory), not bare shard "
                         "URLs")
    out = []
    for rank in range(world_size):
        plan = StreamPlan(
            urls=where.urls,
            counts=where.counts,
            modalities=None,
            batch_size=batch_size,
            num_workers=num_workers,
            shuffle_buffer=0,
            seed=0,
            epoch=0,
            rank=rank,
            world_size=world_size,
            resampled=False,
            on_error="raise",
            drop_last=True,
        )
        out.append(sum(_worker_batches(plan, w) or 0 for w in range(plan.workers)))
    return out


def epoch_batches(
    path: str | Path | DataSource, *, batch_size: int, world_size: int, num_workers: int, split: str = "train"
) -> int:
    """Full batches EVERY rank can produce in ANY epoch, so DDP ranks stay in step.

    Shards move between ranks from epoch to epoch (``epoch_shards``), so this is a bound over every shard
    order: each worker is assumed to draw the smallest shards (exact for equal-size shards)."""
    where = resolve_source(path, split)
    if where.counts is None:
        raise ShardError(f"{where.path}: batch counts need a manifest (a dataset directory), not bare shard "
                         "URLs")
    return batches_every_rank(where.counts, batch_size=batch_size, world_size=world_size,
                              num_workers=num_workers)


def batches_every_rank(counts: Sequence[int], *, batch_size: int, world_size: int, num_workers: int) -> int:
    """:func:`epoch_batches` from the shards' sample counts."""
    smallest = sorted(counts)
    workers = max(1, num_workers)
    per_rank = []
    for rank in range(world_size):
        shards = len(range(rank, len(smallest), world_size))
        per_worker = (len(range(w, shards, workers)) for w in range(workers))
        per_rank.append(sum(sum(smallest[:n]) // batch_size for n in per_worker))
    return min(per_rank)
