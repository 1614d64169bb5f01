"""Word-level tokenizer and vocabulary for caption modalities, and a renderer of captions into image tiles.

A caption becomes a fixed-length int64 vector: word ids, then ``<eos>``, then ``<pad>`` up to ``max_len``
(MMVAE's CUB sentences use the same layout at length 32). The vocabulary is stored beside the shards as
``vocab.json`` so models, samplers and evaluation decode the same ids.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = (PAD, EOS, UNK)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
VOCAB_FILE = "vocab.json"
VOCAB_FORMAT = 1
_TOKEN = re.compile(r"[a-z]+|[.,]")
MIN_FONT_SIZE = 7
"""Smallest font size (pixels) caption tiles shrink to before cutting lines."""


def tokenize(text: str) -> list[str]:
    """Lower-case words and the marks ``.`` and ``,`` as separate tokens; other characters are dropped."""
    return _TOKEN.findall(text.lower())


def detokenize(words: Sequence[str]) -> str:
    """Join tokens with spaces, attaching ``.`` and ``,`` to the word before them."""
    return re.sub(r" ([.,])", r"\1", " ".join(words))


def normalize(text: str) -> str:
    """The canonical form a caption round-trips to: ``detokenize(tokenize(text))``."""
    return detokenize(tokenize(text))


@dataclass(frozen=True)
class Vocabulary:
    """Ids of words; ids 0, 1, 2 are ``<pad>``, ``<eos>``, ``<unk>``."""

    words: tuple[str, ...]
    max_len: int = 32

    def __post_init__(self) -> None:
        if tuple(self.words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {self.words[:3]}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("vocabulary words must be unique")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, texts: Iterable[str], *, max_len: int = 32, extra_words: Iterable[str] = ()) -> Vocabulary:
        """Vocabulary of every token in ``texts`` (plus ``extra_words``), sorted so it is deterministic."""
        found = {w for t in texts for w in tokenize(t)} | set(extra_words)
        return cls(words=SPECIALS + tuple(sorted(found - set(SPECIALS))), max_len=max_len)

    def encode(self, text: str) -> np.ndarray:
        """int64 [max_len]: word ids, ``<eos>``, then ``<pad>``. Raises when the caption does not fit."""
        words = tokenize(text)
        if len(words) + 1 > self.max_len:
            raise ValueError(
                f"caption has {len(words)} tokens + <eos>, more than max_len {self.max_len}: {text!r}"
            )
        ids = np.full(self.max_len, PAD_ID, dtype=np.int64)
        ids[: len(words)] = [self._index.get(w, UNK_ID) for w in words]  # type: ignore[attr-defined]
        ids[len(words)] = EOS_ID
        return ids

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """int64 [N, max_len]."""
        return np.stack([self.encode(t) for t in texts]) if texts else np.zeros((0, self.max_len), np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the ids up to the first ``<eos>`` (or the end); ``<pad>`` is skipped, ``<unk>`` kept."""
        words = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == EOS_ID:
                break
            if i == PAD_ID:
                continue
            if not 0 <= i < len(self.words):
                raise ValueError(f"token id {i} outside the vocabulary of {len(self.words)} words")
            words.append(self.words[i])
        return detokenize(words)

    def decode_batch(self, ids: np.ndarray) -> list[str]:
        """Texts of int ids [N, L]."""
        return [self.decode(row) for row in np.asarray(ids)]

    def save(self, path: str | os.PathLike) -> None:
        """Write ``{"format", "max_len", "specials", "words"}`` as JSON."""
        data = {
            "format": VOCAB_FORMAT,
            "max_len": self.max_len,
            "specials": list(SPECIALS),
            "words": list(self.words),
        }
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`; a directory means its ``vocab.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no vocabulary at {path}; text data sets write vocab.json beside manifest.json"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); regenerate the data set") from exc
        if data.get("format") != VOCAB_FORMAT or not isinstance(data.get("words"), list):
            raise ValueError(f"{path}: expected a vocabulary of format {VOCAB_FORMAT} with a 'words' list")
        return cls(words=tuple(data["words"]), max_len=int(data["max_len"]))


def _wrap(words: list[str], font: Any, width: int) -> list[str]:
    """Greedy word wrap of ``words`` into lines at most ``width`` pixels wide in ``font``."""
    lines: list[str] = []
    line = ""
    for word in words:
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines


def caption_tile(text: str, *, height: int = 64, width: int = 64, font_size: int | None = None) -> np.ndarray:
    """Render ``text`` word-wrapped, black on white, into uint8 [height, width, 3] (for sample grids).

    Pillow's default font (``ImageFont.load_default``: a scalable FreeType font inside Pillow) shrinks until
    the caption fits; lines that still do not fit are cut and the last kept line ends with an ellipsis.
    """
    from PIL import Image, ImageDraw, ImageFont

    size = font_size or max(MIN_FONT_SIZE, height // 5)
    words = text.split()
    while True:
        font = ImageFont.load_default(size)
        line_h = int(font.getbbox("Ag")[3]) + 1
        lines = _wrap(words, font, width - 2)
        if len(lines) * line_h <= height - 2 or size <= MIN_FONT_SIZE or font_size is not None:
            break
        size -= 1
    fit = max(1, (height - 2) // line_h)
    if len(lines) > fit:
        lines = lines[:fit]
        lines[-1] = lines[-1] + "..."
    tile = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(tile)
    for k, line in enumerate(lines):
        draw.text((1, 1 + k * line_h), line, font=font, fill=(0, 0, 0))
    return np.asarray(tile)


def is_token_modality(x: Any) -> bool:
    """A torch tensor of integer ids [N, L] (a text modality), as ``decode``/``generate_*`` return them for
    categorical modalities (images and vectors are floats)."""
    return x.dim() == 2 and not x.dtype.is_floating_point


def caption_tiles(ids: np.ndarray, vocab: Vocabulary, *, height: int = 64, width: int = 64) -> np.ndarray:
    """float32 [N, 3, height, width] in [0, 1]: decoded captions of int ids [N, L] drawn as image tiles."""
    tiles = [caption_tile(vocab.decode(row), height=height, width=width) for row in np.asarray(ids)]
    return (
        np.stack(tiles).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        if tiles
        else np.zeros((0, 3, height, width), np.float32)
    )


def vocabularies(directory: str | os.PathLike) -> dict[str, Vocabulary]:
    """The vocabulary of every token modality of a data set: manifest modalities with a ``vocab`` entry
    (the file beside ``manifest.json``), keyed by modality name; empty for image-only data sets."""
    from mmebm_dist.data.shards import read_manifest

    directory = Path(directory)
    return {
        m["name"]: Vocabulary.load(directory / m["vocab"])
        for m in read_manifest(directory)["modalities"]
        if m.get("vocab")
    }
