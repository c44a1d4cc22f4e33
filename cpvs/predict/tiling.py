"""Cutting fields into overlapping tiles and stitching predictions back (METHODS §4).

Tiles of ``tile`` px start every ``stride`` px; the last row and column of tiles
are shifted to end exactly at the border. Each output pixel is the **median** (or
mean) over the tiles covering it. The field is split into rectangles covered by
the same set of tiles, so the median is exact and costs a few passes over the
pixels instead of a (tiles x pixels) stack.
"""

from __future__ import annotations

import numpy as np

from cpvs.errors import CpvsError


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets along one axis; the last tile ends at ``length``. Needs ``length >= tile``."""
    if tile > length:
        raise ValueError(f"tile {tile} is larger than the field side {length}")
    if stride <= 0 or stride > tile:
        raise CpvsError(f"--stride must be between 1 and the tile size ({tile}), got {stride}")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_grid(shape: tuple[int, int], tile: int, stride: int) -> list[tuple[int, int]]:
    """(y, x) corners of every tile of a field, row by row."""
    return [(y, x) for y in tile_starts(shape[0], tile, stride) for x in tile_starts(shape[1], tile, stride)]


def pad_to_tile(image: np.ndarray, tile: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad (C, H, W) so both sides are at least ``tile``; returns the original (H, W)."""
    h, w = image.shape[-2:]
    ph, pw = max(0, tile - h), max(0, tile - w)
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "edge"
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)), mode=mode)
    return image, (h, w)


def extract_tiles(image: np.ndarray, corners: list[tuple[int, int]], tile: int) -> np.ndarray:
    """(N, C, tile, tile) tiles of a (C, H, W) image."""
    return np.stack([image[:, y : y + tile, x : x + tile] for y, x in corners])


def _segments(starts: list[int], tile: int, length: int) -> list[tuple[int, int, list[int]]]:
    """Intervals [a, b) of one axis with the indices of the tiles covering them."""
    cuts = sorted({0, length, *starts, *(s + tile for s in starts)})
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        cover = [i for i, s in enumerate(starts) if s <= a and b <= s + tile]
        if cover:
            out.append((a, b, cover))
    return out


def stitch(tiles: np.ndarray, shape: tuple[int, int], tile: int, stride: int, method: str = "median") -> np.ndarray:
    """Combine (N, C, tile, tile) predictions made on ``tile_grid(shape, tile, stride)`` into (C, H, W)."""
    if method not in ("median", "mean"):
        raise CpvsError(f"--stitch must be median or mean, got {method!r}")
    ys, xs = tile_starts(shape[0], tile, stride), tile_starts(shape[1], tile, stride)
    if tiles.shape[0] != len(ys) * len(xs):
        raise ValueError(f"expected {len(ys) * len(xs)} tiles, got {tiles.shape[0]}")
    out = np.empty((tiles.shape[1], *shape), dtype=tiles.dtype)
    reduce = np.median if method == "median" else np.mean
    for y0, y1, ycov in _segments(ys, tile, shape[0]):
        for x0, x1, xcov in _segments(xs, tile, shape[1]):
            parts = [tiles[iy * len(xs) + ix, :, y0 - ys[iy] : y1 - ys[iy], x0 - xs[ix] : x1 - xs[ix]] for iy in ycov for ix in xcov]
            out[:, y0:y1, x0:x1] = parts[0] if len(parts) == 1 else reduce(np.stack(parts), axis=0)
    return out
