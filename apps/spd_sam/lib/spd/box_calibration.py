"""Measure a structure's extent on the validated slices by probing the decoder with growing boxes.

Box-trained SAM models segment the dominant object inside the box. On each anchored slice, square
boxes of growing size are tried around the consensus point; the first whose mask holds the point
and stays clear of the box's border has captured the whole object, and that mask's bounding box
(padded) becomes the slice's box. If none fits, the largest probe's mask is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ProbeConfig:
    """Probe sizes and tolerances, in mm."""

    half_sizes_mm: tuple[float, ...] = (5.0, 8.0, 12.0, 18.0)
    border_mm: float = 1.0
    pad_mm: float = 2.0


def probe_boxes(centre: Sequence[float], pixel_mm: np.ndarray, shape, config: ProbeConfig) -> list[Box]:
    """Square (in mm) boxes of growing size around ``centre``, clipped to the slice."""
    boxes = []
    for half in config.half_sizes_mm:
        hr, hc = half / pixel_mm
        boxes.append((max(centre[0] - hr, 0.0), max(centre[1] - hc, 0.0),
                      min(centre[0] + hr, shape[0] - 1.0), min(centre[1] + hc, shape[1] - 1.0)))
    return boxes


def fits_inside(mask: np.ndarray, box: Box, point: Sequence[float], border_px: np.ndarray, shape) -> bool:
    """The mask holds the point and keeps ``border_px`` away from every box edge that is not the image edge."""
    r, c = int(round(point[0])), int(round(point[1]))
    if not mask[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].any():
        return False
    rows, cols = np.nonzero(mask)
    r0, c0, r1, c1 = box
    clear = [
        r0 <= 0 or rows.min() > r0 + border_px[0],
        c0 <= 0 or cols.min() > c0 + border_px[1],
        r1 >= shape[0] - 1 or rows.max() < r1 - border_px[0],
        c1 >= shape[1] - 1 or cols.max() < c1 - border_px[1],
    ]
    return all(clear)


def calibrate_anchor_boxes(
    decode: Callable[[list[int], np.ndarray], np.ndarray],
    anchors: dict[int, Sequence[float]],
    pixel_mm: Sequence[float],
    shape: tuple[int, int],
    config: ProbeConfig = ProbeConfig(),
) -> dict[int, Box]:
    """Box per anchored slice from the decoder's own masks.

    Args:
        decode: ``decode(slice_indices, boxes)`` -> (N, H, W) bool masks, one box per listed slice.
        anchors: slice index -> consensus point (row, col).
        pixel_mm: in-plane spacing (row, col).
        shape: slice shape (H, W).
    """
    pixel_mm = np.asarray(pixel_mm, dtype=float)
    border, pad = config.border_mm / pixel_mm, config.pad_mm / pixel_mm
    probes = {s: probe_boxes(anchors[s], pixel_mm, shape, config) for s in anchors}
    chosen: dict[int, np.ndarray] = {}
    open_slices = sorted(anchors)
    for level in range(len(config.half_sizes_mm)):  # grow only where the smaller box cut the object
        masks = decode(open_slices, np.array([probes[s][level] for s in open_slices], dtype=np.float32))
        still_open = []
        for s, mask in zip(open_slices, masks):
            chosen[s] = mask
            if not fits_inside(mask, probes[s][level], anchors[s], border, shape):
                still_open.append(s)
        open_slices = still_open
        if not open_slices:
            break
    out = {}
    for s, mask in chosen.items():
        if not mask.any():
            out[s] = probes[s][0]
            continue
        rows, cols = np.nonzero(mask)
        out[s] = (max(rows.min() - pad[0], 0.0), max(cols.min() - pad[1], 0.0),
                  min(rows.max() + pad[0], shape[0] - 1.0), min(cols.max() + pad[1], shape[1] - 1.0))
    return out
