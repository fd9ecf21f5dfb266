"""Measure a structure's extent on the validated slices by probing the decoder with growing boxes.

Box-trained SAM models segment the dominant object inside the box. On each anchored slice, square
boxes of growing size are tried around the consensus point. A box smaller than the object gives a
mask cut by the box (or a fragment of the object); once the box holds the whole object, growing it
further leaves the mask unchanged. The first probe whose mask holds the point and agrees with the
next larger probe's mask (IoU) is taken, and that mask's bounding box (padded) becomes the slice's
box. Where no two successive probes agree, the mask is chosen by the structure's size on the other
anchored slices: a click that drifted between touching neighbours gives masks that take in more of
them with each larger probe, while the slices where the probes settled show the structure's own
area; when those areas agree, the mask nearest to them is taken (else the most stable successive
pair). A click that drifted to the edge of its structure would centre the probes half outside it,
so they are centred on the deepest salient pixel near the point instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ProbeConfig:
    """Probe sizes and tolerances, in mm.

    ``aspect`` scales a probe's half-size along rows and columns (the larger is 1): square probes by
    default; a structure's learned size prior gives its in-plane shape. Probes are centred on the
    deepest salient pixel within ``centre_mm`` of the consensus point (see :func:`probe_centre`).
    """

    half_sizes_mm: tuple[float, ...] = (5.0, 8.0, 12.0, 18.0)
    stable_iou: float = 0.85
    steady_area: float = 1.5  # settled areas "agree" when their upper quartile is at most this times the lower
    pad_mm: float = 2.0
    aspect: tuple[float, float] = (1.0, 1.0)
    centre_mm: float = 3.0


def probe_boxes(centre: Sequence[float], pixel_mm: np.ndarray, shape, config: ProbeConfig) -> list[Box]:
    """Boxes of growing size (square in mm, or of ``config.aspect``) around ``centre``, clipped to the slice."""
    boxes = []
    for half in config.half_sizes_mm:
        hr, hc = half * np.asarray(config.aspect) / pixel_mm
        boxes.append((max(centre[0] - hr, 0.0), max(centre[1] - hc, 0.0),
                      min(centre[0] + hr, shape[0] - 1.0), min(centre[1] + hc, shape[1] - 1.0)))
    return boxes


def holds_point(mask: np.ndarray, point: Sequence[float]) -> bool:
    r, c = int(round(point[0])), int(round(point[1]))
    return bool(mask[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].any())


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def size_gap(mask: np.ndarray, typical: float) -> float:
    """How far a mask's area is from ``typical`` pixels, by ratio (|log|: 0 when equal)."""
    return abs(float(np.log(max(int(mask.sum()), 1) / typical)))


def measure_anchor_boxes(
    decode: Callable[[list[int], np.ndarray], np.ndarray],
    anchors: dict[int, Sequence[float]],
    pixel_mm: Sequence[float],
    shape: tuple[int, int],
    config: ProbeConfig = ProbeConfig(),
) -> dict[int, Box]:
    """Box per anchored slice from the decoder's own masks (:func:`probe_anchor_masks`, then :func:`mask_boxes`).

    Args:
        decode: ``decode(slice_indices, boxes)`` -> (N, H, W) bool masks, one box per listed slice.
        anchors: slice index -> consensus point (row, col).
        pixel_mm: in-plane spacing (row, col).
        shape: slice shape (H, W).
    """
    masks, _ = probe_anchor_masks(decode, anchors, pixel_mm, shape, config)
    return mask_boxes(masks, anchors, pixel_mm, shape, config)


def probe_anchor_masks(
    decode: Callable[[list[int], np.ndarray], np.ndarray],
    anchors: dict[int, Sequence[float]],
    pixel_mm: Sequence[float],
    shape: tuple[int, int],
    config: ProbeConfig = ProbeConfig(),
) -> tuple[dict[int, np.ndarray], float | None]:
    """The probe mask taken on each anchored slice, and the structure's :func:`steady_size` from the masks where
    successive probes settled (None: no steady size). Arguments as in :func:`measure_anchor_boxes`."""
    pixel_mm = np.asarray(pixel_mm, dtype=float)
    probes = {s: probe_boxes(anchors[s], pixel_mm, shape, config) for s in anchors}
    masks: dict[int, list[np.ndarray]] = {s: [] for s in anchors}
    chosen: dict[int, np.ndarray] = {}
    open_slices = sorted(anchors)
    for level in range(len(config.half_sizes_mm)):  # grow only where the mask still changes
        found = decode(open_slices, np.array([probes[s][level] for s in open_slices], dtype=np.float32))
        still_open = []
        for s, mask in zip(open_slices, found):
            masks[s].append(mask)
            previous = masks[s][-2] if level else None
            if previous is not None and holds_point(previous, anchors[s]) and iou(previous, mask) >= config.stable_iou:
                chosen[s] = mask
            else:
                still_open.append(s)
        open_slices = still_open
        if not open_slices:
            break
    typical = steady_size([int(m.sum()) for m in chosen.values()], config.steady_area)
    for s in open_slices:  # no agreement
        chosen[s] = _unsettled_choice(masks[s], typical)
    return chosen, typical


def mask_boxes(masks: dict[int, np.ndarray], anchors: dict[int, Sequence[float]], pixel_mm: Sequence[float],
               shape: tuple[int, int], config: ProbeConfig = ProbeConfig()) -> dict[int, Box]:
    """Each anchored slice's mask's bounding box, padded by ``config.pad_mm``; the smallest probe where it is empty."""
    pixel_mm = np.asarray(pixel_mm, dtype=float)
    return {s: padded_box(mask, config.pad_mm / pixel_mm) if mask.any()
            else probe_boxes(anchors[s], pixel_mm, shape, config)[0] for s, mask in masks.items()}


def _unsettled_choice(masks: list[np.ndarray], typical: float | None) -> np.ndarray:
    """The probe mask for a slice where no two successive probes agreed: the one whose area is nearest (by
    ratio) to the structure's steady size ``typical``, when it has one; else the larger mask of the most stable
    successive pair."""
    if typical is not None:
        return min(masks, key=lambda m: size_gap(m, typical))
    pairs = [iou(a, b) for a, b in zip(masks, masks[1:])]
    return masks[int(np.argmax(pairs)) + 1] if pairs else masks[0]


def steady_size(areas: Sequence[int], steady_area: float) -> float | None:
    """The median of the areas of masks where the probes settled, when at least three settled and their areas
    agree (upper quartile at most ``steady_area`` times the lower: a structure of steady size); else None."""
    if len(areas) >= 3 and np.percentile(areas, 75) <= steady_area * np.percentile(areas, 25):
        return float(np.median(areas))
    return None


def padded_box(mask: np.ndarray, pad) -> Box:
    """The bounding box of a non-empty slice mask grown by ``pad`` pixels, clipped to the slice; ``pad`` is
    (rows, cols) or (top, left, bottom, right)."""
    rows, cols = np.nonzero(mask)
    pad = np.resize(np.asarray(pad, dtype=float), 4)
    h, w = mask.shape
    return (max(rows.min() - pad[0], 0.0), max(cols.min() - pad[1], 0.0),
            min(rows.max() + pad[2], h - 1.0), min(cols.max() + pad[3], w - 1.0))


def cover_salient(box: Box, saliency: np.ndarray, point, pixel_mm, pad_mm: float, threshold: float) -> Box:
    """``box`` grown to hold, ``pad_mm`` around, the salient region of a slice under ``point``.

    For a trained head's saliency: on low-contrast tissue the decoder's probe masks stop short of the
    structure, while the head, which learned the structure from saved labels, shows its extent.
    """
    r, c = (int(round(v)) for v in point)
    if not (0 <= r < saliency.shape[0] and 0 <= c < saliency.shape[1]) or saliency[r, c] < threshold:
        return box
    labels, _ = ndimage.label(saliency >= threshold)
    region = padded_box(labels == labels[r, c], pad_mm / np.asarray(pixel_mm, dtype=float))
    return (min(box[0], region[0]), min(box[1], region[1]), max(box[2], region[2]), max(box[3], region[3]))


def probe_centre(saliency: np.ndarray, point, pixel_mm, radius_mm: float, threshold: float) -> np.ndarray:
    """The deepest pixel of the salient region under ``point`` within ``radius_mm`` of it (``point`` itself
    when it is not salient): probes centred there hold the structure rather than its edge."""
    pixel_mm = np.asarray(pixel_mm, dtype=float)
    r, c = (int(round(v)) for v in point)
    if not (0 <= r < saliency.shape[0] and 0 <= c < saliency.shape[1]) or saliency[r, c] < threshold:
        return np.asarray(point, dtype=float)
    reach = np.ceil(2 * radius_mm / pixel_mm).astype(int)
    r0, c0 = max(r - reach[0], 0), max(c - reach[1], 0)
    window = saliency[r0:r + reach[0] + 1, c0:c + reach[1] + 1] >= threshold
    labels, _ = ndimage.label(window)
    region = labels == labels[r - r0, c - c0]
    depth = ndimage.distance_transform_edt(np.pad(region, 1), sampling=pixel_mm)[1:-1, 1:-1]
    rr, cc = np.indices(region.shape)
    near = np.hypot((rr + r0 - point[0]) * pixel_mm[0], (cc + c0 - point[1]) * pixel_mm[1]) <= radius_mm
    depth[~near] = -1
    best = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return np.array([best[0] + r0, best[1] + c0], dtype=float)
