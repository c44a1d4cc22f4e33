"""Tiling and overlap-median stitching are exact."""

from __future__ import annotations

import numpy as np
import pytest

from cpvs.errors import CpvsError
from cpvs.predict.tiling import extract_tiles, pad_to_tile, stitch, tile_grid, tile_starts

SHAPES = [(998, 998), (1080, 1080), (512, 512), (300, 700)]


def test_tile_starts_end_flush_with_the_border():
    assert tile_starts(998, 256, 128) == [0, 128, 256, 384, 512, 640, 742]
    assert tile_starts(512, 256, 128) == [0, 128, 256]
    assert tile_starts(256, 256, 128) == [0]
    for n in (257, 300, 998, 1080):
        s = tile_starts(n, 256, 128)
        assert s[0] == 0 and s[-1] + 256 == n and all(b - a <= 128 for a, b in zip(s, s[1:]))
    with pytest.raises(CpvsError):
        tile_starts(998, 256, 300)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["median", "mean"])
def test_identity_model_reproduces_every_field(shape, method):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, *shape)).astype(np.float32)
    corners = tile_grid(shape, 256, 128)
    tiles = extract_tiles(image, corners, 256)
    out = stitch(tiles, shape, 256, 128, method)
    assert out.dtype == image.dtype
    if method == "median":
        assert np.array_equal(out, image)
    else:  # a float mean of k equal values may round in the last bit
        np.testing.assert_allclose(out, image, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_pixel_is_the_median_of_the_tiles_covering_it(shape):
    corners = tile_grid(shape, 256, 128)
    # A "model" whose output depends on where the tile is: a different value per tile.
    values = np.random.default_rng(1).permutation(len(corners)).astype(np.float64) * 1.5
    tiles = np.broadcast_to(values[:, None, None, None], (len(corners), 1, 256, 256)).copy()
    out = stitch(tiles, shape, 256, 128, "median")[0]
    # Brute force: collect, for every pixel, the values of all tiles that cover it.
    covering = [[[] for _ in range(shape[1])] for _ in range(shape[0])]
    for v, (y, x) in zip(values, corners):
        for yy in range(y + (-y % 7), y + 256, 7):  # every 7th row/column keeps the reference quick
            for xx in range(x + (-x % 7), x + 256, 7):
                covering[yy][xx].append(v)
    for yy in range(0, shape[0], 7):
        for xx in range(0, shape[1], 7):
            if covering[yy][xx]:
                assert out[yy, xx] == np.median(covering[yy][xx]), (yy, xx)
    interior = covering[301][301] if shape[0] > 400 and shape[1] > 400 else None
    if interior is not None:
        assert len(interior) == 4  # half-tile stride: interior pixels are covered by four tiles


def test_fields_smaller_than_a_tile_are_padded():
    img = np.arange(2 * 100 * 180, dtype=np.float32).reshape(2, 100, 180)
    padded, shape = pad_to_tile(img, 128)
    assert padded.shape == (2, 128, 180) and shape == (100, 180)
    assert np.array_equal(padded[:, :100], img)
