"""Shared by the importers: reading and checking source files, and writing shards + manifest atomically.

Every importer lists its tuples first (paths, labels, encoded captions: cheap, in the main process), then
:func:`write_import` decodes and writes them in worker processes with the builders' shard writer, into a
staging folder that becomes ``--out`` only when everything succeeded (:func:`staging_dir`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmebm_dist.data import shards
from mmebm_dist.data.codec import MAX_PNG_PIXELS, encode_png
from mmebm_dist.data.text import VOCAB_FILE, Vocabulary, detokenize, tokenize
from mmebm_dist.datasets import generated
from mmebm_dist.datasets.generated import staging, swap_in
from mmebm_dist.locks import output_lock

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class ImportDataError(ValueError):
    """Source data that cannot be imported; the message names the file (and row or key) and the fix."""


MISSING_HINT = "or pass --allow-missing to import the tuple with that modality absent (an incomplete set)"


def missing_file(path: Path, allow_missing: bool) -> bool:
    """Whether the tuple lacks the modality stored in ``path``: True when the file does not exist and
    ``--allow-missing`` allows it; an ImportDataError naming the file and the flag when it is not allowed."""
    if path.is_file():
        return False
    if allow_missing:
        return True
    raise ImportDataError(f"{path}: file does not exist; restore it, {MISSING_HINT}")


def mark_incomplete(manifest: dict[str, Any], held: dict[str, np.ndarray]) -> dict[str, Any]:
    """``manifest`` marked incomplete, with the tuples holding each modality per split, when ``held`` (per
    split, int [M] in manifest order) falls short of a split's count somewhere; unchanged otherwise."""
    counts = {split: manifest["splits"][split]["count"] for split in held}
    if all((held[split] == counts[split]).all() for split in held):
        return manifest
    names = shards.modality_names(manifest)
    return {**manifest, "incomplete": True, "presence": {
        "counts": {split: {n: int(c) for n, c in zip(names, held[split], strict=True)} for split in held}}}


# ------------------------------------------------------------------------------------------------ reading


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. ``64x64``) -> (H, W); argparse-friendly ValueError otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"size {text!r}: expected HxW with positive integers, e.g. 64x64")
    return int(parts[0]), int(parts[1])


def image_mode(path: Path) -> str:
    """``L`` for a grey image, ``RGB`` otherwise: the mode every image of its modality is converted to."""

    with _opened_image(path) as img:
        return "L" if img.mode in GREY_MODES else "RGB"


@contextlib.contextmanager
def _opened_image(path: Path) -> Iterator[Any]:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ImportDataError(f"{path}: image file does not exist")
    try:
        with Image.open(path) as img:  # reads the header only
            if img.width * img.height > MAX_PNG_PIXELS:  # checked before the pixels are decompressed
                raise ImportDataError(f"{path}: its header declares {img.width}x{img.height} pixels, more "
                                      f"than the {MAX_PNG_PIXELS:,} allowed; resize it or remove the file")
            img.load()
            yield img
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL raises SyntaxError on some headers
        raise ImportDataError(f"{path}: cannot decode the image ({exc}); replace or remove the file") from exc


def read_image(path: Path, mode: str, resize: tuple[int, int] | None) -> np.ndarray:
    """uint8 [H, W, C] of an image file in ``mode`` (C = 1 for ``L``, 3 for ``RGB``), resized to ``resize``
    (H, W) with PIL's antialiased bilinear filter when given. Grey images become RGB in a colour modality
    (an alpha channel is dropped); a colour image in a grey modality is an error."""
    from PIL import Image

    with _opened_image(path) as img:
        if mode == "L" and img.mode not in GREY_MODES:  # converting would drop the colour silently
            raise ImportDataError(
                f"{path}: colour image ({img.mode}) in a modality whose first image is grey; "
                "store every image of a modality in one mode"
            )
        img = img.convert(mode)
        if resize is not None and img.size != (resize[1], resize[0]):
            img = img.resize((resize[1], resize[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def check_shape(arr: np.ndarray, expected: tuple[int, ...], where: str, hint: str) -> None:
    """Raise naming ``where`` when ``arr`` is not ``expected`` (shapes as stored: [H, W, C] for images)."""
    if tuple(arr.shape) != tuple(expected):
        raise ImportDataError(
            f"{where}: shape {list(arr.shape)}, the modality's first sample has {list(expected)}; {hint}"
        )


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file; an ImportDataError naming the file and line of the first bad byte."""
    if not path.is_file():
        raise ImportDataError(f"{path}: file does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ImportDataError(
            f"{path}: line {line} is not UTF-8 (byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8"
        ) from exc


def parse_label(value: Any, where: str) -> int:
    """A label as a non-negative int (``3``, ``"3"``); an ImportDataError naming ``where`` otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        label = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        label = int(value)
    else:
        raise ImportDataError(
            f"{where}: label {value!r} is not an integer; labels are class indices 0, 1, ..."
        )
    if label < 0:
        raise ImportDataError(f"{where}: label {label} is negative; labels are class indices 0, 1, ...")
    return label


def read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array as float32 (vector modalities feed float networks); errors name the file."""
    if not path.is_file():
        raise ImportDataError(f"{path}: .npy file does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ImportDataError(f"{path}: not a readable .npy array ({exc})") from exc
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ImportDataError(f"{path}: dtype {arr.dtype} is not numeric")
    return arr.astype(np.float32)


def encode_captions(
    texts: dict[str, list[str]], *, max_len: int, min_count: int = 1
) -> tuple[Vocabulary, dict[str, np.ndarray], int]:
    """Vocabulary of the ``train`` texts (words seen at least ``min_count`` times; others become ``<unk>``),
    int64 ids [N, max_len] per split, and how many captions were cut to ``max_len - 1`` words."""
    counts: dict[str, int] = {}
    for text in texts.get("train", []):
        for word in tokenize(text):
            counts[word] = counts.get(word, 0) + 1
    vocab = Vocabulary.build(
        [], max_len=max_len, extra_words=[w for w, c in counts.items() if c >= min_count]
    )
    cut = 0
    out = {}
    for split, items in texts.items():
        rows = []
        for text in items:
            words = tokenize(text)
            if len(words) > max_len - 1:
                words, cut = words[: max_len - 1], cut + 1
            rows.append(vocab.encode(detokenize(words)))
        out[split] = np.stack(rows) if rows else np.zeros((0, max_len), np.int64)
    return vocab, out, cut


# ------------------------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh, uniquely named folder beside ``out`` that replaces ``out`` when the block succeeds and is
    removed when it fails, so an import either writes a whole data set or leaves ``out`` as it was; an
    exclusive lock on ``out`` refuses a second import or build into it meanwhile."""
    out = Path(out).resolve()
    with output_lock(out):
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty: choose another --out or pass --overwrite "
                "(which replaces the whole folder)"
            )
        with staging(out) as stage:
            yield stage
            swap_in(stage, out)


# A sample builder: (worker state, split, index) -> ([(entry, bytes), ...], label), run in worker processes.
SampleFn = Callable[[dict[str, Any], str, int], tuple[list[tuple[str, bytes]], int]]


def _write_import_shard(job: tuple[str, int, int, int]) -> dict:
    """Write one shard; its manifest entry plus ``held``: how many of its tuples hold each modality."""
    split, index, start, end = job
    st = generated.worker_state()
    samples = []
    held = np.zeros(len(st["entries"]), dtype=np.int64)
    for i in range(start, end):
        entries, label = st["sample_fn"](st, split, i)
        has = np.array([e in {name for name, _ in entries} for e in st["entries"]])
        if not has.any() or not (has.all() or st["allow_missing"]):
            lacks = [e for e, h in zip(st["entries"], has, strict=True) if not h]
            fix = "a tuple needs one modality at least" if not has.any() else MISSING_HINT
            raise ImportDataError(f"{st['where']}: {split} tuple {i} lacks {lacks}; {fix}")
        held += has
        samples.append((f"{i:09d}", [*entries, (shards.LABEL_EXT, str(label).encode())]))
    return {**generated.write_shard(Path(st["out"]), split, index, samples), "held": held}


def write_import(
    stage: Path,
    sample_fn: SampleFn,
    counts: dict[str, int],
    *,
    state: dict[str, Any],
    modalities: list[dict[str, Any]],
    class_names: list[str],
    source: dict[str, Any],
    builder: dict[str, Any],
    shard_size: int,
    workers: int,
    progress: bool,
    vocab: Vocabulary | None = None,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Write the shards (``sample_fn`` per tuple, in worker processes) and the manifest into ``stage``; with
    ``allow_missing`` a tuple may lack modalities (``sample_fn`` leaves their entries out): the manifest is
    then marked incomplete (:func:`mark_incomplete`)."""
    if counts.get("train", 0) < 1:
        raise ImportDataError(f"{source.get('path')}: no train tuples found")
    if vocab is not None:
        vocab.save(stage / VOCAB_FILE)
    entries = generated.write_shards(
        _write_import_shard,
        counts,
        shard_size,
        state={**state, "sample_fn": sample_fn, "out": str(stage), "allow_missing": allow_missing,
               "entries": [s.entry for s in shards.modality_specs({"modalities": modalities})],
               "where": source.get("path")},
        workers=workers,
        desc=builder["command"],
        unit="tuple",
        progress=progress,
    )
    manifest = generated.manifest_base(
        modalities=modalities,
        class_names=class_names,
        counts=counts,
        entries=entries,
        source=source,
        seed=int(builder.get("seed", 0)),
        builder=builder,
    )
    held = {split: sum((e["held"] for e in entries if e["split"] == split), np.zeros(len(modalities), int))
            for split in shards.SPLITS}
    manifest = mark_incomplete(manifest, held)
    shards.write_manifest(stage, manifest)
    return manifest


def image_modality(name: str, shape_hwc: tuple[int, int, int], origin: str) -> dict[str, Any]:
    """Manifest entry of a PNG image modality of stored shape [H, W, C]."""
    h, w, c = shape_hwc
    return {"name": name, "shape": [c, h, w], "dtype": "uint8", "encoding": "png", "origin": origin}


def text_modality(name: str, vocab: Vocabulary, origin: str) -> dict[str, Any]:
    """Manifest entry of a caption modality: int64 ids [max_len] with the vocabulary beside the manifest."""
    return {
        "name": name,
        "shape": [vocab.max_len],
        "dtype": "int64",
        "encoding": "npy",
        "vocab": VOCAB_FILE,
        "vocab_size": len(vocab),
        "origin": origin,
    }


def png_entry(name: str, image: np.ndarray) -> tuple[str, bytes]:
    """The tar entry of an image modality."""
    return f"{name}.png", encode_png(image)


def npy_entry(name: str, array: np.ndarray) -> tuple[str, bytes]:
    """The tar entry of an array modality."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return f"{name}.npy", buf.getvalue()


RESIZE_HINT = "pass --resize HxW to bring every image to one size"


def first_image_spec(path: Path, resize: tuple[int, int] | None) -> tuple[str, tuple[int, int, int]]:
    """(mode, stored shape [H, W, C]) that a modality takes from its first image."""
    mode = image_mode(path)
    return mode, tuple(read_image(path, mode, resize).shape)  # type: ignore[return-value]


def checked_image(
    path: Path, mode: str, resize: tuple[int, int] | None, expected: tuple[int, ...], where: str = ""
) -> np.ndarray:
    """:func:`read_image` checked against the modality's shape; errors name the file (and ``where``)."""
    arr = read_image(path, mode, resize)
    check_shape(arr, expected, f"{path}{where}", RESIZE_HINT)
    return arr
