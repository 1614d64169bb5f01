"""CUB image-captions as MMVAE uses them (iffsid/mmvae, src/datasets.py and the CUB image/sentence models).

Layout: ``SRC/{train,test}/<class folder>/<image>`` (torchvision ImageFolder: class folders sorted, files
sorted) and ``SRC/text_trainvalclasses.txt`` / ``SRC/text_testclasses.txt`` with ten captions per image in
image order, one per line. As in MMVAE, every caption is one tuple whose image is image ``j // 10``
(its ``resampler``), images are resized to 64x64, captions keep at most 31 words + ``<eos>`` (length 32) and
the vocabulary holds the train words seen more than three times (MMVAE's ``min_occ = 3``). Differences:
captions are the file's lines and go through this package's tokenizer (lower-case words, ``.`` and ``,``)
rather than NLTK's sentence and word tokenizers, unknown words map to ``<unk>`` (MMVAE: ``<exc>``), and the
label is the class folder's index among the train and test folders together (the splits hold different
classes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmebm_dist.data.text import UNK_ID
from mmebm_dist.datasets.importers.common import (
    IMAGE_SUFFIXES,
    MISSING_HINT,
    ImportDataError,
    checked_image,
    encode_captions,
    first_image_spec,
    image_modality,
    npy_entry,
    png_entry,
    read_utf8,
    staging_dir,
    text_modality,
    write_import,
)

SPLITS = ("train", "test")
CAPTION_FILES = {"train": "text_trainvalclasses.txt", "test": "text_testclasses.txt"}
CAPTIONS_PER_IMAGE = 10
MMVAE_IMAGE_SIZE = (64, 64)
MMVAE_MAX_TOKENS = 32
MMVAE_MIN_COUNT = 4
"""Words seen at least this often in train captions get an id (MMVAE keeps occurrence > 3)."""


def scan_images(root: Path) -> list[tuple[Path, str]]:
    """(image, class folder name) in ImageFolder order: class folders sorted, then files sorted."""
    if not root.is_dir():
        raise ImportDataError(f"{root}: missing; cub-captions needs SRC/{{train,test}}/<class>/<image>")
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        out += [(p, folder.name) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not out:
        raise ImportDataError(f"{root}: no images in its class folders")
    return out


def read_captions(path: Path, images: int, per_image: int, allow_missing: bool = False) -> list[str]:
    """The caption lines of ``path`` (UTF-8), checked to be ``per_image`` per image; with ``allow_missing``
    an empty line is a tuple without its caption."""
    lines = [line.strip() for line in read_utf8(path).splitlines()]
    lines = lines[:-1] if lines and not lines[-1] else lines
    if len(lines) != images * per_image:
        raise ImportDataError(
            f"{path}: {len(lines)} captions for {images} images; expected {per_image} per "
            "image, in image order"
        )
    for n, line in enumerate(lines, start=1):
        if not line and not allow_missing:
            raise ImportDataError(f"{path}: line {n} is empty; every image needs {per_image} captions, "
                                  f"{MISSING_HINT}")
    return lines


def unknown_share(ids: np.ndarray) -> float:
    """Share of the word tokens (not ``<pad>`` / ``<eos>``) that are ``<unk>``."""
    words = ids >= UNK_ID
    return float((ids == UNK_ID).sum() / max(int(words.sum()), 1))


def _sample(st: dict[str, Any], split: str, i: int) -> tuple[list[tuple[str, bytes]], int]:
    path, label = st["images"][split][i // st["per_image"]]
    cache = st.setdefault("_last", {})
    if cache.get("path") != path:  # consecutive tuples share an image: decode it once
        cache["path"] = path
        cache["png"] = png_entry("image", checked_image(path, "RGB", st["resize"], st["shape"]))
    if st["texts"][split][i]:
        return [cache["png"], npy_entry("caption", st["ids"][split][i])], label
    return [cache["png"]], label  # no caption (--allow-missing)


def import_cub_captions(
    src: str | Path,
    out: str | Path,
    *,
    resize: tuple[int, int] = MMVAE_IMAGE_SIZE,
    max_tokens: int = MMVAE_MAX_TOKENS,
    min_count: int = MMVAE_MIN_COUNT,
    per_image: int = CAPTIONS_PER_IMAGE,
    shard_size: int = 1000,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Import CUB images + captions from ``src`` into ``out``; the manifest."""
    src = Path(src)
    scanned = {split: scan_images(src / split) for split in SPLITS}
    class_names = sorted({c for split in SPLITS for _, c in scanned[split]})
    index = {c: k for k, c in enumerate(class_names)}
    images = {split: [(p, index[c]) for p, c in scanned[split]] for split in SPLITS}
    texts = {
        split: read_captions(src / CAPTION_FILES[split], len(images[split]), per_image, allow_missing)
        for split in SPLITS
    }
    vocab, ids, cut = encode_captions(texts, max_len=max_tokens, min_count=min_count)
    _, shape = first_image_spec(images["train"][0][0], resize)
    shape = (*shape[:2], 3)  # every image is converted to RGB (CUB holds a few grey JPEGs)
    counts = {split: len(texts[split]) for split in SPLITS}
    with staging_dir(Path(out), overwrite) as stage:
        return write_import(
            stage,
            _sample,
            counts,
            state={"images": images, "ids": ids, "texts": texts, "per_image": per_image, "resize": resize,
                   "shape": shape},
            modalities=[image_modality("image", shape, str(src)), text_modality("caption", vocab, str(src))],
            class_names=class_names,
            source={
                "name": "cub-captions",
                "origin": str(src),
                "path": str(src),
                **counts,
                "images": {s: len(images[s]) for s in SPLITS},
            },
            builder={
                "command": "import cub-captions",
                "resize": list(resize),
                "max_tokens": max_tokens,
                "min_count": min_count,
                "captions_per_image": per_image,
                "captions_cut": cut,
                "unknown_word_share": unknown_share(ids["train"]),
                "shard_size": shard_size,
            },
            shard_size=shard_size,
            workers=workers,
            progress=progress,
            vocab=vocab,
            allow_missing=allow_missing,
        )
