"""The in-plane region a structure's masks are decoded in: a square around its boxes, snapped to a coarse grid.

SAM-family encoders see every slice at a fixed input size (256 pixels for LiteMedSAM), so a small
structure on a whole slice covers few embedding cells. Decoding the same boxes on a crop around
them gives it several times more (on synthetic brain MRI the exact-box ceiling rose from 0.60 to
0.72, see ``scripts/bench_crop.py``). A crop has to be embedded on its own, so the region is made
stable: its side comes from a ladder of sizes and its centre from a grid, so that boxes that move
by a few millimetres (a correction, another annotator) land on the same region and its cached
embeddings, and a structure's last region is kept while its new boxes fit in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Region = tuple[slice, slice]  # rows, cols of a slice


@dataclass(frozen=True)
class FocusConfig:
    """How the region is chosen.

    Args:
        margin_mm: context kept around the boxes (the encoder sees the structure with its surroundings).
        min_side_px: the smallest side (the ladder's first rung).
        ladder: ratio between successive sides.
        snap: the centre moves in steps of this fraction of the side.
        max_fraction: a region whose side exceeds this fraction of the slice's longer side gains too
            little resolution to pay for its own embeddings: the whole slice is used instead.
    """

    margin_mm: float = 4.0
    min_side_px: int = 32
    ladder: float = 1.25
    snap: float = 0.125
    max_fraction: float = 0.6


def focus_region(points: Sequence[Sequence[float]], pixel_mm: Sequence[float], shape: Sequence[int],
                 config: FocusConfig = FocusConfig(), previous: Region | None = None) -> Region | None:
    """The square (in pixels) to decode in, holding every point with ``margin_mm`` around it, or None when
    the whole slice should be used.

    Args:
        points: (row, col) on the slices, all slices together (the corners of the boxes to decode).
        pixel_mm: in-plane spacing (row, col).
        shape: the slice's (rows, cols).
        config: margin, ladder, grid and limit.
        previous: the structure's last region: kept if it holds what is needed and is at most one rung
            larger than a new one would be.
    """
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    if points.size == 0:
        return None
    room = config.margin_mm / np.asarray(pixel_mm, dtype=float)
    low = np.maximum(points.min(axis=0) - room, 0)
    high = np.minimum(points.max(axis=0) + room, np.asarray(shape) - 1)
    # the snapped centre is off by at most half a step: the side leaves room for it
    side = _rung(float(np.max(high - low)) / (1 - config.snap), config)
    if side > config.max_fraction * max(shape):
        return None
    if previous is not None and all(r.start <= lo and hi < r.stop and r.stop - r.start <= side * config.ladder
                                    for r, lo, hi in zip(previous, low, high)):
        return previous
    step = max(side * config.snap, 1.0)
    centre = (points.min(axis=0) + points.max(axis=0)) / 2
    region = []
    for c, length in zip(np.round(centre / step) * step, shape):
        size = min(side, int(length))
        start = int(np.clip(round(c - size / 2), 0, length - size))
        region.append(slice(start, start + size))
    return tuple(region)


def _rung(length: float, config: FocusConfig) -> int:
    """The smallest side on the ladder that is at least ``length``."""
    if length <= config.min_side_px:
        return config.min_side_px
    return int(math.ceil(config.min_side_px * config.ladder ** math.ceil(math.log(length / config.min_side_px, config.ladder))))
