"""Shared by the data set builders (PolyMNIST, street numbers, birds): the bundled photos, photo crops, masks,
parallel shard writing and sample grids.

Every sample depends only on (seed, split, index), and shards are written by worker processes from that
alone, so the bytes do not depend on the worker count. The shard/manifest format is the one of
:mod:`mmebm_dist.data.shards` (``mmebm data verify`` and ``make_loader`` read it).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from mmebm_dist.data import shards
from mmebm_dist.data.grid import image_grid
from mmebm_dist.locks import output_lock

log = logging.getLogger(__name__)

SPLIT_IDS = {"train": 0, "test": 1}
MAX_WORKERS = 256
"""Most worker processes a build or import may start (a typo must not fork thousands)."""
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
"""ITU-R BT.601 luma weights."""
# Colour photos shipped inside scikit-image's wheel that load offline (checked with scikit-image 0.26).
BACKGROUNDS = (
    "coffee",
    "chelsea",
    "hubble_deep_field",
    "immunohistochemistry",
    "rocket",
    "astronaut",
    "retina",
)


def load_backgrounds(count: int) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 [H, W, 3]) for modalities 0..count-1: modality k uses photo k mod len(BACKGROUNDS)."""
    import skimage.data

    cache: dict[str, np.ndarray] = {}
    out = []
    for k in range(count):
        name = BACKGROUNDS[k % len(BACKGROUNDS)]
        if name not in cache:
            img = np.asarray(getattr(skimage.data, name)())
            if img.ndim != 3 or img.shape[2] < 3 or img.dtype != np.uint8:
                raise RuntimeError(
                    f"skimage.data.{name}() gave {img.dtype} {img.shape}, expected uint8 [H, W, 3]"
                )
            cache[name] = np.ascontiguousarray(img[:, :, :3])
        out.append((name, cache[name]))
    return out


def load_photos() -> list[np.ndarray]:
    """The colour photos bundled with scikit-image (PolyMNIST's backgrounds), uint8 [H, W, 3] each."""
    return [photo for _, photo in load_backgrounds(len(BACKGROUNDS))]


def photo_crop(
    rng: np.random.Generator,
    photos: Sequence[np.ndarray],
    *,
    side: tuple[int, int],
    size: int,
    blur: tuple[float, float],
) -> Image.Image:
    """A random square crop (side in ``side``, clipped to the photo) of a random photo, maybe mirrored,
    box-resized to ``size`` x ``size`` and Gaussian-blurred with a radius drawn from ``blur`` (pixels)."""
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    edge = int(rng.integers(min(side[0], h, w), min(side[1], h, w) + 1))
    top, left = int(rng.integers(h - edge + 1)), int(rng.integers(w - edge + 1))
    crop = Image.fromarray(photo[top : top + edge, left : left + edge])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = crop.resize((size, size), Image.Resampling.BOX)
    return crop.filter(ImageFilter.GaussianBlur(float(rng.uniform(*blur))))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a [H, W] bool mask by a (2 radius + 1) square (separable running max)."""
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(2)])
        n = out.shape[axis]
        out = np.logical_or.reduce(
            [np.take(padded, range(k, k + n), axis=axis) for k in range(2 * radius + 1)]
        )
    return out


def ring_contrast(
    image: np.ndarray, shape: np.ndarray, ink: np.ndarray, *, ring: int, luminance: bool
) -> float:
    """How much a drawn shape stands out from the ring of pixels around it, on the final uint8 [H, W, 3].

    Core = ``shape`` coverage >= 0.5; ring = pixels within ``ring`` px of the core that no drawn shape covers
    (``ink``, the total coverage, <= 0.05). ``luminance``: |mean luma difference| (BT.601, in [0, 1]); else
    the distance of the mean RGB colours / sqrt(3) (in [0, 1]). No core or no ring scores 0 (not visible).
    """
    core = shape >= 0.5
    around = dilate(core, ring) & (ink <= 0.05)
    if not core.any() or not around.any():
        return 0.0
    x = image.astype(np.float32) / 255.0
    if luminance:
        y = x @ LUMA
        return float(abs(y[core].mean() - y[around].mean()))
    return float(np.linalg.norm(x[core].mean(0) - x[around].mean(0)) / np.sqrt(3.0))


def versions() -> dict[str, str]:
    """Versions of the packages whose output the rendered bytes depend on (stored in the manifest)."""
    from PIL import features

    out = {name: metadata.version(name) for name in ("numpy", "pillow", "matplotlib", "scikit-image")}
    out["freetype"] = str(features.version("freetype2"))
    return out


def our_files(out: Path, extra: Iterable[str] = (), nested: Iterable[str] = ()) -> list[Path]:
    """The files of a data set a builder wrote in ``out``: shards, the manifest, files named by the ``extra``
    regexes and files matching the ``nested`` globs (relative to ``out``: a folder layout's images)."""
    patterns = [r"(train|test)-\d{6}\.tar", re.escape(shards.MANIFEST), *extra]
    if not out.is_dir():
        return []
    ours = [p for p in out.glob("*") if p.is_file() and any(re.fullmatch(pat, p.name) for pat in patterns)]
    return ours + [p for pattern in nested for p in out.glob(pattern) if p.is_file()]


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool, extra: Iterable[str] = (),
                  nested: Iterable[str] = ()) -> Iterator[Path]:
    """A fresh hidden folder beside ``out`` to build into, under an exclusive lock on ``out``; it replaces the
    data set in ``out`` only once the block returned (the manifest written), so a failed or killed build
    leaves the previous set whole, and two builds aimed at one folder never interleave (the second is
    refused naming the first). Other files in ``out`` stay. Refuses an existing data set without
    ``overwrite`` (``extra``/``nested``: see :func:`our_files`)."""
    out = Path(out).resolve()
    with output_lock(out):
        ours = our_files(out, extra, nested)
        if ours and not overwrite:
            raise FileExistsError(
                f"{out} already holds a data set ({len(ours)} shard/manifest/side files): choose "
                "another --out or pass --overwrite"
            )
        with staging(out) as stage:
            yield stage
            others = {p.name for p in out.iterdir() if p not in ours and p.name not in shards.SPLITS} \
                if out.is_dir() else set()
            swap_in(stage, out, keep=others)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A new, uniquely named folder ``.<out>.staging-<pid>-<random>`` beside ``out``, removed if the block
    fails or is interrupted (it is gone after a successful :func:`swap_in`). Call under the output lock: the
    staging and set-aside folders a killed build left beside an existing ``out`` are removed (logged); with
    ``out`` missing, a set-aside folder may hold the only complete set and is kept."""
    if out.exists() and Path.cwd().resolve().is_relative_to(out):
        raise FileExistsError(f"--out {out} is (or holds) the current directory; replacing it would pull the "
                              "folder from under this shell: choose a subfolder as --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # under the output lock, so these are left by a killed build or import: superseded
        left = [*out.parent.glob(f".{out.name}.staging-*"), *out.parent.glob(f".{out.name}.replaced-*")]
        for stale in left:
            log.warning("removing %s, left by a build of %s that was killed", stale, out)
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    stage = out.parent / f".{out.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def swap_in(stage: Path, out: Path, keep: Iterable[str] = ()) -> None:
    """Put the complete folder ``stage`` in place of ``out`` with two renames (``out`` aside, ``stage`` in);
    then move back the old ``out``'s entries named in ``keep`` and delete the rest. A kill between the
    renames leaves the old and the new set whole in hidden folders beside ``out``; never a mixed one."""
    keep = set(keep)
    if not out.exists():
        stage.rename(out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    stage.rename(out)
    if old.is_dir():
        for entry in old.iterdir():
            if entry.name in keep and not (out / entry.name).exists():
                entry.rename(out / entry.name)
        shutil.rmtree(old)
    else:
        old.unlink()


# Per-process state of the workers (set by _init_worker; read-only afterwards).
_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    _STATE.clear()
    _STATE.update(state)


def worker_state() -> dict[str, Any]:
    """The state given to :func:`parallel_map` (inside a worker or the main process)."""
    return _STATE


def parallel_map(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    *,
    state: dict[str, Any],
    workers: int,
    desc: str,
    unit: str,
    weight: Callable[[Any], int] = lambda job: 1,
    progress: bool = True,
) -> list[Any]:
    """``[fn(job) for job in jobs]`` in worker processes (fork) that see ``state`` via :func:`worker_state`.

    Results come back in job order, so the output does not depend on ``workers``; tqdm counts ``weight(job)``.
    """
    from tqdm import tqdm

    if not 0 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers {workers}: must be in [0, {MAX_WORKERS}] (0: one per core)")
    workers = min(workers or os.cpu_count() or 1, len(jobs)) if jobs else 1
    bar = tqdm(total=sum(weight(j) for j in jobs), desc=desc, unit=unit, disable=not progress)
    results = []
    try:
        if workers <= 1:
            _init_worker(state)
            for job in jobs:
                results.append(fn(job))
                bar.update(weight(job))
        else:
            ctx = multiprocessing.get_context(
                "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            )
            with ctx.Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
                for job, result in zip(jobs, pool.imap(fn, jobs), strict=True):
                    results.append(result)
                    bar.update(weight(job))
    finally:
        bar.close()
    return results


def write_shards(
    shard_writer: Callable[[tuple[str, int, int, int]], dict],
    counts: dict[str, int],
    shard_size: int,
    *,
    state: dict[str, Any],
    workers: int,
    desc: str,
    unit: str,
    progress: bool = True,
) -> list[dict]:
    """``shard_writer(job)`` for every job of :func:`shard_jobs` in worker processes (:func:`parallel_map`;
    tqdm counts samples): what each call returns (e.g. :func:`write_shard`'s entry), in job order."""
    return parallel_map(
        shard_writer,
        shard_jobs(counts, shard_size),
        state=state,
        workers=workers,
        desc=desc,
        unit=unit,
        weight=lambda job: job[3] - job[2],
        progress=progress,
    )


def shard_jobs(counts: dict[str, int], shard_size: int) -> list[tuple[str, int, int, int]]:
    """(split, shard index, first sample, end) of every shard of every split, in shards.SPLITS order."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    return [
        (split, i, start, min(start + shard_size, counts[split]))
        for split in shards.SPLITS
        for i, start in enumerate(range(0, counts[split], shard_size))
    ]


def write_shard(
    out: Path, split: str, index: int, samples: Iterable[tuple[str, list[tuple[str, bytes]]]]
) -> dict:
    """Write (key, [(ext, bytes), ...]) samples as shard ``index`` of ``split``; its manifest entry."""
    members = [(f"{key}.{ext}", data) for key, entries in samples for ext, data in entries]
    count = len({name.split(".", 1)[0] for name, _ in members})
    path = out / shards.shard_name(split, index)
    shards.write_tar(path, members)
    return {
        "name": path.name,
        "split": split,
        "index": index,
        "count": count,
        "bytes": path.stat().st_size,
        "sha256": shards.sha256_file(path),
    }


def manifest_base(
    *,
    modalities: list[dict],
    class_names: Sequence[str],
    counts: dict[str, int],
    entries: list[dict],
    source: dict,
    seed: int,
    builder: dict,
    layout: str = "shards",
) -> dict[str, Any]:
    """A manifest in the format of :mod:`mmebm_dist.data.shards`; ``entries`` are what the shard writers
    returned (those without a ``name`` wrote folder files, not a shard)."""
    written = [e for e in entries if "name" in e]
    return {
        "format": shards.FORMAT_NAME,
        "format_version": shards.FORMAT_VERSION,
        "layout": layout,
        "modalities": modalities,
        "class_names": list(class_names),
        "splits": {
            split: {"count": counts[split], "shards": sum(1 for e in written if e["split"] == split)}
            for split in shards.SPLITS
        },
        "shards": [{k: e[k] for k in ("name", "split", "count", "bytes", "sha256") if k in e}
                   for e in written],
        "source": source,
        "seed": seed,
        "builder": builder,
    }


def save_grid(png: str | os.PathLike, tiles: Sequence[np.ndarray], columns: int, *, scale: int) -> Path:
    """Write the grid of ``tiles`` (3 px apart, enlarged ``scale`` times) as a PNG; creates its folder."""
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(tiles, columns, pad=3, scale=scale)).save(out)
    return out
