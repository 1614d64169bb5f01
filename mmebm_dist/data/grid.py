"""The one image grid behind every picture of samples: data set previews, eval PNGs, TensorBoard images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def image_grid(tiles: Sequence[np.ndarray] | np.ndarray, columns: int, *, pad: int = 2, fill: float = 255,
               scale: int = 1) -> np.ndarray:
    """[H, W, C] grid of ``tiles`` ([h, w, C], or grey [h, w] drawn as 3 channels), filled row by row,
    ``columns`` per row, ``pad`` pixels of ``fill`` around every cell; rows are as tall as the tallest tile,
    each column as wide as its widest; enlarged ``scale`` times (nearest neighbour). Keeps the dtype."""
    if columns < 1 or not len(tiles):
        raise ValueError(f"a grid needs at least one tile and one column, got {len(tiles)} and {columns}")
    tiles = [np.repeat(t[..., None], 3, axis=2) if t.ndim == 2 else t for t in tiles]
    h = max(t.shape[0] for t in tiles)
    widths = [max(t.shape[1] for t in tiles[c::columns]) for c in range(min(columns, len(tiles)))]
    rows = -(-len(tiles) // columns)
    channels = tiles[0].shape[2]
    canvas = np.full((rows * (h + pad) + pad, sum(widths) + pad * (len(widths) + 1), channels), fill,
                     tiles[0].dtype)
    for k, t in enumerate(tiles):
        r, c = divmod(k, columns)
        x = pad + sum(widths[:c]) + pad * c
        y = pad + r * (h + pad)
        canvas[y : y + t.shape[0], x : x + t.shape[1]] = t
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas
