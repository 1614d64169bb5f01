"""data.grid.image_grid: the one grid behind data set previews, eval PNGs and TensorBoard images."""

import numpy as np
import pytest
import torch

from mmebm_dist.data.grid import image_grid
from mmebm_dist.evaluate import report


def test_grid_places_images_exactly():
    images = torch.zeros(3, 3, 2, 2)
    images[1] = 1.0
    grid = image_grid(report.to_uint8(images), 2, pad=1, fill=7)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 3)
    assert (grid[1:3, 1:3] == 0).all() and (grid[1:3, 4:6] == 255).all() and (grid[4:6, 1:3] == 0).all()
    assert (grid[4:6, 4:6] == 7).all() and grid[0, 0, 0] == 7


def test_columns_take_their_widest_tile_grey_becomes_rgb_and_scale_repeats_pixels():
    narrow, wide = np.full((2, 1), 10, np.uint8), np.full((2, 3, 3), 20, np.uint8)
    grid = image_grid([narrow, wide, wide, narrow], 2, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 + 3 + 3 * 1, 3)  # each column holds a wide tile: 3 pixels wide
    assert (grid[1:3, 1:2] == 10).all() and (grid[1:3, 2:4] == 255).all()  # grey tile, then fill
    assert (grid[1:3, 5:8] == 20).all()
    big = image_grid([narrow], 1, pad=0, scale=3)
    assert big.shape == (6, 3, 3) and (big == 10).all()


def test_float_tiles_keep_their_dtype_and_an_empty_grid_is_refused():
    grid = image_grid(np.ones((2, 2, 2, 1), np.float32), 2, pad=0, fill=0)
    assert grid.dtype == np.float32 and grid.shape == (2, 4, 1) and (grid == 1).all()
    with pytest.raises(ValueError, match="at least one tile"):
        image_grid([], 2)
