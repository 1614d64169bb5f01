"""argparse ``type=`` converters the commands share: a bad value becomes argparse's one-line refusal."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def at_least_ten(text: str) -> int:
    """argparse type: an integer >= 10 (every digit class needs an image)."""
    value = int(text)
    if value < 10:
        raise argparse.ArgumentTypeError(f"must be >= 10 so that every digit class has an image, got {value}")
    return value


def font_file(text: str) -> str:
    """argparse type: an existing .ttf/.otf file."""
    if not Path(text).is_file() or Path(text).suffix.lower() not in (".ttf", ".otf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing .ttf/.otf file")
    return text


def image_size(text: str) -> tuple[int, int]:
    """argparse type: ``HxW`` (e.g. 64x64) -> (H, W)."""
    from mmebm_dist.datasets.importers.common import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def modality_kind(text: str) -> tuple[str, str]:
    """argparse type: ``NAME=KIND`` -> (NAME, KIND)."""
    from mmebm_dist.datasets.importers.table import parse_modality

    try:
        return parse_modality(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
