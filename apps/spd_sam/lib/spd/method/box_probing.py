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

Masks are torch tensors on the decoder's device (numpy masks are taken as they are, on the CPU), and
what is decided on them comes to the host once per probe size, not per slice. Where a batch of masks
costs little more than one (a GPU), every probe of every slice can be decoded in one call, and what is
decided comes to the host once; else only the slices whose masks still change are decoded at the next
size. Both take the same masks. The probes' centres, and the salient extent a trained head shows, are
searched on the saliency's device for every anchored slice at once; each search comes to the host in one
copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .assembly import reconstruct

Box = tuple[float, float, float, float]
Masks = torch.Tensor | np.ndarray
Decoder = Callable[[list[int], np.ndarray], Masks]


@dataclass(frozen=True)
class ProbeConfig:
    """Probe sizes and tolerances, in mm.

    ``aspect`` scales a probe's half-size along rows and columns (the larger is 1): square probes by
    default; a structure's learned size prior gives its in-plane shape. Probes are centred on the
    deepest salient pixel within ``centre_mm`` of the consensus point (see :func:`probe_centres`).
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


def as_masks(masks: Masks | Sequence[Masks]) -> torch.Tensor:
    """Masks as one (N, H, W) bool tensor: a tensor or numpy array of that shape as it is (on its device; numpy
    shares its memory), or a sequence of (H, W) masks stacked."""
    if isinstance(masks, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(masks)
    return torch.stack([torch.as_tensor(m) for m in masks])


def areas(masks: torch.Tensor) -> torch.Tensor:
    """The pixel count of each mask of a (..., H, W) bool stack (int64, on the masks' device)."""
    # row by row in int16 first (a row is under 2^15 pixels): a CPU sums bools straight into int64 ten times slower
    return masks.sum(-1, dtype=torch.int16).sum(-1)


def iou(overlap: int, area_a: int, area_b: int) -> float:
    """The IoU of two masks from their pixel counts: their overlap and their areas (0 where both are empty)."""
    union = area_a + area_b - overlap
    return overlap / union if union else 0.0


def holds_point(masks: torch.Tensor, points: Sequence[Sequence[float]]) -> torch.Tensor:
    """Whether each mask of an (N, H, W) stack has a pixel in the 3 x 3 window around its point (row, col); a point
    more than a pixel off the slice holds nothing. Bool, on the masks' device."""
    h, w = masks.shape[-2:]
    centres = np.rint(np.asarray(points, dtype=float)).astype(np.int64).reshape(-1, 2)
    rows, cols = np.clip(centres[:, :1] + [-1, 0, 1], 0, h - 1), np.clip(centres[:, 1:] + [-1, 0, 1], 0, w - 1)
    on_slice = ((centres >= -1) & (centres <= [h, w])).all(1)
    # the window's pixels and whether the point is on the slice, in one copy to the device
    index = torch.as_tensor(np.column_stack([(rows[:, :, None] * w + cols[:, None, :]).reshape(-1, 9), on_slice]),
                            device=masks.device)
    return masks.flatten(-2).gather(1, index[:, :9]).any(1) & index[:, 9].bool()


def size_gap(area: int, typical: float) -> float:
    """How far an area (pixels) is from ``typical`` pixels, by ratio (|log|: 0 when equal)."""
    return abs(float(np.log(max(int(area), 1) / typical)))


def measure_anchor_boxes(
    decode: Decoder,
    anchors: dict[int, Sequence[float]],
    pixel_mm: Sequence[float],
    shape: tuple[int, int],
    config: ProbeConfig = ProbeConfig(),
    all_levels_at_once: bool = False,
) -> dict[int, Box]:
    """Box per anchored slice from the decoder's own masks (:func:`probe_anchor_masks`, then :func:`mask_boxes`).

    Args:
        decode: ``decode(slice_indices, boxes)`` -> (N, H, W) bool masks (torch, on any device, or numpy), one box
            per listed slice.
        anchors: slice index -> consensus point (row, col).
        pixel_mm: in-plane spacing (row, col).
        shape: slice shape (H, W).
        all_levels_at_once: decode every probe of every slice in one call (where a batch costs little more than one
            mask: a GPU) instead of one probe size after another for the slices whose masks still change (where
            each mask costs: a CPU). The same masks are taken either way.
    """
    masks, _ = probe_anchor_masks(decode, anchors, pixel_mm, shape, config, all_levels_at_once)
    return mask_boxes(masks, anchors, pixel_mm, shape, config)


@dataclass
class _Tried:
    """The probe masks decoded on one slice (smallest first), their areas, and the IoU of each successive pair."""

    masks: list[torch.Tensor]
    areas: list[int]
    ious: list[float] = field(default_factory=list)

    def add(self, mask: torch.Tensor, area: int, overlap: int) -> float:
        """Add the next larger probe's mask, of ``area`` pixels, ``overlap`` of them in the last mask; its IoU with
        the last mask."""
        self.ious.append(iou(overlap, self.areas[-1], area))
        self.masks.append(mask)
        self.areas.append(area)
        return self.ious[-1]


def probe_anchor_masks(
    decode: Decoder,
    anchors: dict[int, Sequence[float]],
    pixel_mm: Sequence[float],
    shape: tuple[int, int],
    config: ProbeConfig = ProbeConfig(),
    all_levels_at_once: bool = False,
) -> tuple[dict[int, torch.Tensor], float | None]:
    """The probe mask taken on each anchored slice (on the decoder's device), and the structure's
    :func:`steady_size` from the masks where successive probes settled (None: no steady size). Arguments as in
    :func:`measure_anchor_boxes`; what is decided comes to the host once per probe size (once in all when
    ``all_levels_at_once``)."""
    if not anchors:
        return {}, None
    pixel_mm = np.asarray(pixel_mm, dtype=float)
    probes = {s: probe_boxes(anchors[s], pixel_mm, shape, config) for s in sorted(anchors)}
    probe_level = (_all_levels_at_once if all_levels_at_once else _level_by_level)(decode, probes, anchors)
    found, measured = probe_level(list(probes), 0)
    tried = {s: _Tried([mask], [area]) for s, mask, (area, *_) in zip(probes, found, measured)}
    chosen: dict[int, torch.Tensor] = {}
    open_slices = list(probes)
    for level in range(1, len(config.half_sizes_mm)):  # grow only where the mask still changes
        found, measured = probe_level(open_slices, level)
        still_open = []
        for s, mask, (area, overlap, holds) in zip(open_slices, found, measured):
            agreement = tried[s].add(mask, area, overlap)
            if holds and agreement >= config.stable_iou:
                chosen[s] = mask
            else:
                still_open.append(s)
        open_slices = still_open
        if not open_slices:
            break
    typical = steady_size([tried[s].areas[-1] for s in chosen], config.steady_area)
    for s in open_slices:  # no agreement
        chosen[s] = _unsettled_choice(tried[s], typical)
    return chosen, typical


ProbeLevel = Callable[[list[int], int], tuple[torch.Tensor, list[list[int]]]]


def _level_by_level(decode: Decoder, probes: dict[int, list[Box]], anchors: dict[int, Sequence[float]]) -> ProbeLevel:
    """``probe_level(slices, level)``: the masks of those slices' probes of one size, decoded when asked, and
    what is decided on them (:func:`_measured`, against each slice's mask of the size before), in one copy."""
    last: dict[int, torch.Tensor] = {}

    def probe_level(slices: list[int], level: int) -> tuple[torch.Tensor, list[list[int]]]:
        found = as_masks(decode(slices, np.array([probes[s][level] for s in slices], dtype=np.float32)))
        previous = torch.stack([last[s] for s in slices]) if level else torch.zeros_like(found)
        last.update(zip(slices, found))
        return found, _measured(found, previous, [anchors[s] for s in slices])
    return probe_level


def _all_levels_at_once(decode: Decoder, probes: dict[int, list[Box]], anchors: dict[int, Sequence[float]]
                        ) -> ProbeLevel:
    """``probe_level(slices, level)`` as :func:`_level_by_level` gives it, from every probe of every slice decoded
    in one call and measured in one copy."""
    found = as_masks(decode([s for s, boxes in probes.items() for _ in boxes],
                            np.array([box for boxes in probes.values() for box in boxes], dtype=np.float32)))
    levels = len(found) // len(probes)
    by_level = found.reshape(len(probes), levels, *found.shape[-2:])
    previous = torch.cat([torch.zeros_like(by_level[:, :1]), by_level[:, :-1]], 1).flatten(0, 1)
    measured = _measured(found, previous, [anchors[s] for s in probes for _ in range(levels)])
    by_slice = {s: (by_level[i], measured[i * levels:(i + 1) * levels]) for i, s in enumerate(probes)}
    return lambda slices, level: (torch.stack([by_slice[s][0][level] for s in slices]),
                                  [by_slice[s][1][level] for s in slices])


def _measured(found: torch.Tensor, previous: torch.Tensor, points: Sequence[Sequence[float]]) -> list[list[int]]:
    """For each mask of an (N, H, W) stack: its area, its overlap with the same slice's mask of the probe size
    before (``previous``; empty at the first size) and whether that one holds the slice's point (1 or 0)."""
    return torch.stack([areas(found), areas(previous & found), holds_point(previous, points).long()], 1).tolist()


def mask_boxes(masks: dict[int, Masks], anchors: dict[int, Sequence[float]], pixel_mm: Sequence[float],
               shape: tuple[int, int], config: ProbeConfig = ProbeConfig()) -> dict[int, Box]:
    """Each anchored slice's mask's bounding box, padded by ``config.pad_mm``; the smallest probe where it is empty."""
    if not masks:
        return {}
    pixel_mm = np.asarray(pixel_mm, dtype=float)
    stack = as_masks(list(masks.values()))
    return {s: _grown(extent, config.pad_mm / pixel_mm, stack.shape[-2:]) if extent is not None
            else probe_boxes(anchors[s], pixel_mm, shape, config)[0] for s, extent in zip(masks, _mask_extents(stack))}


def _unsettled_choice(tried: _Tried, typical: float | None) -> torch.Tensor:
    """The probe mask for a slice where no two successive probes agreed: the one whose area is nearest (by
    ratio) to the structure's steady size ``typical``, when it has one; else the larger mask of the most stable
    successive pair."""
    if typical is not None:
        return tried.masks[min(range(len(tried.masks)), key=lambda level: size_gap(tried.areas[level], typical))]
    return tried.masks[int(np.argmax(tried.ious)) + 1] if tried.ious else tried.masks[0]


def steady_size(areas: Sequence[int], steady_area: float) -> float | None:
    """The median of the areas of masks where the probes settled, when at least three settled and their areas
    agree (upper quartile at most ``steady_area`` times the lower: a structure of steady size); else None."""
    if len(areas) >= 3 and np.percentile(areas, 75) <= steady_area * np.percentile(areas, 25):
        return float(np.median(areas))
    return None


def _mask_extents(masks: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """The first and last row and column (top, left, bottom, right) of each mask of an (N, H, W) bool stack; None
    for an empty mask."""
    # the rows and columns that hold a pixel from int16 sums, as in :func:`areas`: a CPU's any() is as slow
    (top, bottom), (left, right) = (_first_last(masks.sum(axis, dtype=torch.int16) > 0) for axis in (-1, -2))
    return [tuple(b) if b[0] <= b[2] else None for b in torch.stack([top, left, bottom, right], 1).tolist()]


def _first_last(covered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last True index along the last axis of ``covered`` (first > last where none is True)."""
    index = torch.arange(covered.shape[-1], device=covered.device)
    return torch.where(covered, index, covered.shape[-1]).amin(-1), torch.where(covered, index, -1).amax(-1)


def padded_box(mask: Masks, pad) -> Box:
    """The bounding box of a non-empty slice mask grown by ``pad`` pixels, clipped to the slice; ``pad`` is
    (rows, cols) or (top, left, bottom, right)."""
    return _grown(_mask_extents(torch.as_tensor(mask)[None])[0], pad, mask.shape)


def _grown(extent: tuple[int, int, int, int], pad, shape) -> Box:
    """A mask's extent (top, left, bottom, right) grown by ``pad`` pixels, clipped to a slice of ``shape``."""
    top, left, bottom, right = extent
    pad = np.resize(np.asarray(pad, dtype=float), 4).tolist()
    h, w = shape
    return (max(top - pad[0], 0.0), max(left - pad[1], 0.0),
            min(bottom + pad[2], h - 1.0), min(right + pad[3], w - 1.0))


def cover_salient_boxes(boxes: dict[int, Box], saliency: Masks, points: dict[int, Sequence[float]], first: int,
                        pixel_mm, pad_mm: float, threshold: float) -> dict[int, Box]:
    """Each slice's box grown to hold, ``pad_mm`` around, the salient region under the slice's point.

    For a trained head's saliency: on low-contrast tissue the decoder's probe masks stop short of the
    structure, while the head, which learned the structure from saved labels, shows its extent. Slice ``s`` of
    ``boxes`` is ``saliency[s - first]`` ((N, H, W), torch on any device, or numpy); all the slices' regions are
    found at once there and their extents come to the host in one copy.
    """
    saliency = torch.as_tensor(saliency)
    pixels = _on_slice(points, saliency.shape[-2:])
    searched = [s for s in boxes if s in pixels]
    if not searched:
        return dict(boxes)
    at = torch.as_tensor([(s - first, *pixels[s]) for s in searched], device=saliency.device)
    values = saliency[at[:, 0]]
    point = (torch.arange(len(at), device=values.device), at[:, 1], at[:, 2])
    seeds = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    seeds[point] = _salient_pixel(values[point], threshold)
    regions = reconstruct(seeds, values >= threshold, axes=(1, 2), cross=True)  # scipy's label: 4-connected
    pad = pad_mm / np.asarray(pixel_mm, dtype=float)
    covered = dict(boxes)
    for s, extent in zip(searched, _mask_extents(regions)):
        if extent is not None:
            box, region = boxes[s], _grown(extent, pad, values.shape[-2:])
            covered[s] = (min(box[0], region[0]), min(box[1], region[1]), max(box[2], region[2]),
                          max(box[3], region[3]))
    return covered


def probe_centres(saliency: Masks, points: dict[int, Sequence[float]], first: int, pixel_mm, radius_mm: float,
                  threshold: float) -> dict[int, np.ndarray]:
    """For each slice's point, the deepest pixel of the salient region under it within ``radius_mm`` of it (the
    point itself when it is off the slice or not salient): probes centred there hold the structure rather than
    its edge.

    Slice ``s`` of ``points`` is ``saliency[s - first]`` ((N, H, W), torch on any device, or numpy). The region is
    searched in the window of ``2 * radius_mm`` around the rounded point (clipped to the slice), depth being the
    distance (mm) to the nearest pixel outside the region or the window; the first deepest pixel in raster order
    is taken. Every window is searched at once there and the centres come to the host in one copy.
    """
    saliency = torch.as_tensor(saliency)
    pixel_mm = np.asarray(pixel_mm, dtype=float)
    height, width = saliency.shape[-2:]
    centres = {s: np.asarray(point, dtype=float) for s, point in points.items()}
    pixels = _on_slice(points, (height, width))
    if not pixels:
        return centres
    reach = np.ceil(2 * radius_mm / pixel_mm).astype(int)
    # each window in a frame of its slice's pixels one wider all round: what is off the window is outside the region
    at = np.array(list(pixels.values()))
    rows = at[:, :1] + np.arange(-reach[0] - 1, reach[0] + 2)
    cols = at[:, 1:] + np.arange(-reach[1] - 1, reach[1] + 2)
    in_window = (((rows >= 0) & (rows < height) & (np.abs(rows - at[:, :1]) <= reach[0]))[:, :, None]
                 & ((cols >= 0) & (cols < width) & (np.abs(cols - at[:, 1:]) <= reach[1]))[:, None, :])
    point = np.array([centres[s] for s in pixels])
    near = np.hypot((rows - point[:, :1])[:, :, None] * pixel_mm[0],
                    (cols - point[:, 1:])[:, None, :] * pixel_mm[1]) <= radius_mm
    shape = in_window.shape
    layout = torch.as_tensor(np.stack([  # one copy to the device
        np.broadcast_to((np.array(list(pixels)) - first)[:, None, None], shape),
        np.broadcast_to(rows.clip(0, height - 1)[:, :, None], shape),
        np.broadcast_to(cols.clip(0, width - 1)[:, None, :], shape), in_window, near]), device=saliency.device)
    values = saliency[layout[0], layout[1], layout[2]]
    seeds = torch.zeros(shape, dtype=torch.bool, device=values.device)
    seeds[:, reach[0] + 1, reach[1] + 1] = _salient_pixel(values[:, reach[0] + 1, reach[1] + 1], threshold)
    region = reconstruct(seeds, layout[3].bool() & (values >= threshold), axes=(1, 2), cross=True)
    depth = torch.where(layout[4].bool(), _depth(region, pixel_mm), -1.0)
    best = torch.where(layout[3].bool(), depth, -torch.inf).flatten(1).argmax(1)
    for s, r0, c0, (held, index) in zip(pixels, rows[:, 0], cols[:, 0],
                                        torch.stack([region[:, reach[0] + 1, reach[1] + 1], best], 1).tolist()):
        if held:
            centres[s] = np.array([r0 + index // shape[2], c0 + index % shape[2]], dtype=float)
    return centres


def _on_slice(points: dict[int, Sequence[float]], shape) -> dict[int, tuple[int, int]]:
    """The pixel (rounded row, col) of each point that lies on a slice of ``shape``."""
    pixels = {s: (int(round(point[0])), int(round(point[1]))) for s, point in points.items()}
    return {s: (r, c) for s, (r, c) in pixels.items() if 0 <= r < shape[0] and 0 <= c < shape[1]}


def _salient_pixel(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Whether pixels' saliency reaches ``threshold``, compared in float64 as numpy compares one pixel's value (a
    scalar); a slice's pixels compare in its own dtype, as numpy compares an array."""
    return values.double() >= threshold


def _depth(region: torch.Tensor, pixel_mm: np.ndarray) -> torch.Tensor:
    """Each pixel's distance (mm) to the nearest pixel outside the region, of an (N, H, W) stack of regions
    clear of the border (0 outside), exactly as scipy's ``distance_transform_edt`` gives it:
    sqrt((rows * row_mm)^2 + (cols * col_mm)^2) in float64, least along each row first, then across rows
    (rounding keeps the order of sums and roots)."""
    def squared(n: int, mm: float) -> torch.Tensor:  # (n, n): squared mm between two indices along an axis
        steps = torch.arange(n, dtype=torch.float64, device=region.device)
        apart = (steps[:, None] - steps) * mm
        return apart * apart

    height, width = region.shape[-2:]
    along_rows = torch.where(region[:, :, None, :], torch.inf, squared(width, pixel_mm[1])).amin(-1)
    return (squared(height, pixel_mm[0])[:, :, None] + along_rows[:, None]).amin(2).sqrt()
