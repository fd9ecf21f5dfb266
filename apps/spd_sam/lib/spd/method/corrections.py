"""Corrective clicks on a 3D result, acting where the annotator points and on the slices the error continues to.

Masks here are stacks of slices along the segmentation's axis: (D, H, W), rows and columns the other
axes in order; points are (slice, row, col).

- A **negative** click inside the mask removes the leak around it: the part of the mask that is
  geodesically nearer to the click than to any positive prompt or, where no trained head knows the
  structure, to the mask's core (where it is much deeper in its slice than the click: a leak is
  thinner than the structure), where paths run inside the mask
  and crossing an intensity edge costs more (so the cut falls on the boundary between the
  structure and what it leaked into). The leak is followed onto adjacent slices as far as it
  stays nearer to the click, within a few gaps between the annotator's clicks.
- A **positive** click outside the mask adds what was missed: the decoder segments a box measured
  around the click (box probing), the part holding the click is added (bounded by the size and
  intensity of the structure nearby and, where the mask covers the slice, by the click's distance
  from it: the miss is a local one), and the added region is tracked onto adjacent slices with a
  box around it while it stays coherent (as 3D assembly trims the ends). Toward slices the mask
  covers it goes up to the mask and a share of the reach into it; past the mask's end, the whole
  reach. So a click past the structure's end extends it and fills the slices between; those the
  walk leaves empty are decoded in boxes interpolated between the click's part and the mask's
  end (as SPD fills the slices between clicks). The click itself is always added. Where the
  backbone takes a dense prompt, the current mask is fed back with the box and the click (PG-SAM's
  iterative refinement); box-only backbones get the box. Where a trained saliency head knows the
  structure, a click does not add what the head rules out, nor remove what the head is sure of
  (except right around the click).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage
from skimage.graph import MCP_Geometric

from ..runtime.backbones import PromptBatch
from .box_probing import ProbeConfig, measure_anchor_boxes, padded_box

Point = tuple[int, int, int]  # (slice, row, col)
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class CorrectionConfig:
    """How far and how freely corrections act (lengths in mm, reach in gaps between the annotator's clicks)."""

    reach_gaps: float = 2.0
    within_share: float = 0.5  # into slices the mask already covers, a positive click's part goes this share of it
    miss_widths: float = 2.0  # on a slice the mask covers, what a positive click adds lies within this many times
    # its distance from the mask
    click_mm: float = 3.0  # radius around a positive click that is added when the decoder's part leaves it out
    edge_weight: float = 4.0  # extra geodesic cost of a strong intensity edge (relative to the mask's 90th percentile)
    guard_mm: float = 5.0  # interpolated prompts this close to a negative click do not defend the mask there
    core_depths: float = 2.0  # mask voxels deeper in their slice than this many times a negative click's depth
    # defend the structure (a leak is thinner than the structure it leaked from)
    min_overlap: float = 0.5  # a tracked slice's part must overlap the previous slice's this much (of its area)
    max_growth: float = 1.3  # ... and grow by at most this factor
    min_new: float = 0.05  # a tracked slice that adds less than this share of its part ends the walk
    max_shift: float = 2.0  # ... as does one whose mean intensity leaves the clicked part's by this many of its SDs
    min_shift: float = 0.05  # (the tolerance is at least this, in windowed intensity)
    ruled_out: float = 0.05  # a positive click adds nothing where a trained head gives the structure less chance
    sure: float = 0.5  # ... and a negative one removes nothing where it gives this or more (beyond click_mm of both)


@dataclass
class ClickEffect:
    """What one corrective click changed."""

    ijk: list[int]
    positive: bool
    added: int = 0
    removed: int = 0
    slices: tuple[int, int] | None = None  # first and last slice changed
    note: str = ""

    def to_json(self) -> dict:
        return {"ijk": self.ijk, "positive": self.positive, "voxels_added": self.added,
                "voxels_removed": self.removed, "slices": None if self.slices is None else list(self.slices),
                "note": self.note}


def leak_around(mask: np.ndarray, image: np.ndarray, click: Point, defenders: np.ndarray,
                spacing: Sequence[float], reach: int, config: CorrectionConfig = CorrectionConfig(),
                hold_core: bool = True) -> np.ndarray:
    """The region a negative ``click`` inside ``mask`` says is wrong (bool, the stack's shape; empty when the click
    lies outside the mask).

    Args:
        mask: (D, H, W) current mask; image: the same slices, windowed to [0, 1].
        defenders: (n, 3) positive prompts (slice, row, col) that hold the structure.
        spacing: (slice, row, col) voxel size in mm.
        reach: slices on either side of the click the leak may extend to.
        hold_core: the mask's core (``config.core_depths``) holds the structure too; False where a trained head's
            veto (:func:`uncontradicted`) keeps what the structure is.
    """
    out = np.zeros(mask.shape, dtype=bool)
    if not mask[click]:
        return out
    s = click[0]
    lo, hi = max(s - reach, 0), min(s + reach + 1, mask.shape[0])
    occupied = np.argwhere(mask[lo:hi])
    (r0, c0), (r1, c1) = occupied[:, 1:].min(0), occupied[:, 1:].max(0) + 1
    box = (slice(lo, hi), slice(r0, r1), slice(c0, c1))
    local = mask[box]
    start = (s - lo, click[1] - r0, click[2] - c0)
    labels, _ = ndimage.label(local, structure=CONNECTIVITY)
    piece = labels == labels[start]
    seeds = np.asarray(defenders, dtype=int).reshape(-1, 3) - [lo, r0, c0]
    inside = np.all((seeds >= 0) & (seeds < local.shape), axis=1)
    seeds = seeds[inside]
    seeds = seeds[piece[tuple(seeds.T)]] if len(seeds) else seeds
    if len(seeds) == 0:  # nothing the annotator asked for is connected to it within reach: all of it goes
        out[box] = piece
        return out
    if hold_core:
        depth = np.stack([ndimage.distance_transform_edt(np.pad(m, 1), sampling=spacing[1:])[1:-1, 1:-1] for m in local])
        seeds = np.vstack([seeds, np.argwhere(piece & (depth > config.core_depths * depth[start]))])
    edges = ndimage.gaussian_gradient_magnitude(image[box].astype(np.float32), sigma=1.0)
    scale = float(np.percentile(edges[piece], 90)) + 1e-6
    costs = np.where(piece, 1.0 + config.edge_weight * edges / scale, np.inf)
    from_click = MCP_Geometric(costs, sampling=tuple(spacing)).find_costs([start])[0]
    from_structure = MCP_Geometric(costs, sampling=tuple(spacing)).find_costs([tuple(p) for p in seeds])[0]
    nearer = piece & (from_click < from_structure)
    labels, _ = ndimage.label(nearer, structure=CONNECTIVITY)
    if labels[start]:
        out[box] = labels == labels[start]
    return out


SliceDecoder = Callable[[int, PromptBatch], np.ndarray]  # (slice, one slice's prompts) -> (H, W) mask


def missed_around(mask: np.ndarray, image: np.ndarray, click: Point, decode: SliceDecoder, pixel_mm: Sequence[float],
                  reach: int, dense: bool, blocked: np.ndarray | None = None, probes: ProbeConfig = ProbeConfig(),
                  config: CorrectionConfig = CorrectionConfig()) -> np.ndarray:
    """The region a positive ``click`` outside ``mask`` says is missing (bool, the stack's shape).

    Args:
        mask: (D, H, W) current mask; image: the same slices, windowed to [0, 1] (where the walk may go).
        decode: segments one slice from one prompt set (whole-slice pixels).
        pixel_mm: in-plane spacing (row, col).
        reach: slices on either side of the click the added region may extend to.
        dense: feed the current mask back to the decoder as a dense prompt (backbones that take one).
        blocked: voxels earlier negative clicks removed; tracking does not add them back.
    """
    out = np.zeros(mask.shape, dtype=bool)
    s, point = click[0], np.array(click[1:], dtype=float)
    if mask[click]:
        return out
    shape = mask.shape[1:]

    def segment(t: int, box) -> np.ndarray:  # the click is a point prompt on its own slice only
        prompts = PromptBatch(boxes=np.array([box], dtype=np.float32),
                              points=point[None, None].astype(np.float32) if t == s else None,
                              point_labels=np.ones((1, 1), dtype=np.int64) if t == s else None,
                              mask_logits=np.where(mask[t], 8.0, -8.0)[None].astype(np.float32) if dense else None)
        return decode(t, prompts)

    def probe(at: list[int], boxes: np.ndarray) -> np.ndarray:
        return np.stack([segment(t, b) for t, b in zip(at, boxes)])

    box = measure_anchor_boxes(probe, {s: point}, pixel_mm, shape, probes)[s]
    found = _part_holding(segment(s, box), point)
    part = found
    nearby = mask[max(s - reach, 0):s + reach + 1]
    size = int(nearby.sum(axis=(1, 2)).max())
    if size:  # what the decoder found must look like, and be no larger than, the structure nearby
        values = image[max(s - reach, 0):s + reach + 1][nearby]
        like = np.abs(image[s] - values.mean()) <= max(config.max_shift * float(values.std()), config.min_shift)
        part = _part_holding(part & like, point)
        limit = config.max_growth * size
        if part.sum() > limit:
            part &= _disc(shape, point, np.sqrt(limit / np.pi))
    r, c = (int(round(v)) for v in point)
    bound = None
    if mask[s].any():  # a miss beside the mask is about as wide as the click is deep in it
        depth = ndimage.distance_transform_edt(~mask[s], sampling=pixel_mm)[r, c]
        bound = _disc(shape, point, max(config.miss_widths * depth, config.click_mm) / min(pixel_mm))
        part &= bound
    if not part[r, c]:  # the click is always answered: at least the decoder's part close around it
        part = (found & _disc(shape, point, config.click_mm / min(pixel_mm))) | _disc(shape, point, 1.0)
    out[s] = part & ~mask[s]
    # A click past the mask's end extends it by the whole reach and bridges back to the mask; toward slices the
    # mask covers, the miss is local.
    within = max(int(round(config.within_share * reach)), 1)
    covered = np.flatnonzero(mask.any(axis=(1, 2)))
    gaps = (s - covered[covered < s].max() if (covered < s).any() else np.inf,
            covered[covered > s].min() - s if (covered > s).any() else np.inf)
    reaches = tuple(min(gap - 1 + within, reach) if gap <= reach else reach for gap in gaps)
    follow(out, part, s, mask, image, segment, pixel_mm, reaches, blocked, probes, config, bound, size)
    for gap, step in zip(gaps, (-1, 1)):
        if 1 < gap <= reach:
            bridge(out, part, s, s + step * int(gap), mask, segment, pixel_mm, blocked, probes)
    return out


def uncontradicted(region: np.ndarray, click: Point, positive: bool, saliency: Callable[[list[int]], np.ndarray | None],
                   pixel_mm: Sequence[float], config: CorrectionConfig = CorrectionConfig()) -> np.ndarray:
    """The part of ``region`` (what a ``click`` adds, or removes when it is negative) that a trained saliency head
    does not contradict: nothing is added where the head gives the structure less than ``config.ruled_out``
    chance, nothing removed where it gives ``config.sure`` or more; within ``click_mm`` of the click the
    annotator's word stands. All of ``region`` where no head serves.

    Args:
        saliency: ``saliency(slices)`` -> (N, H, W) the head's maps of those slices, or None (no head).
    """
    touched = [int(t) for t in np.flatnonzero(region.any(axis=(1, 2)))]
    maps = saliency(touched) if touched else None
    if maps is None:
        return region
    keep = np.zeros(region.shape, dtype=bool)
    keep[touched] = maps >= config.ruled_out if positive else maps < config.sure
    keep[click[0]] |= _disc(region.shape[1:], np.array(click[1:], dtype=float), config.click_mm / min(pixel_mm))
    return region & keep


def bridge(out: np.ndarray, part: np.ndarray, s: int, end: int, mask: np.ndarray,
           segment: Callable[[int, tuple], np.ndarray], pixel_mm: Sequence[float], blocked: np.ndarray | None = None,
           probes: ProbeConfig = ProbeConfig()) -> None:
    """Fill the slices between ``part`` (slice ``s``) and the mask's nearest slice ``end`` that are still empty in
    ``mask`` and ``out``: each is decoded in a box interpolated between the part's and the mask's boxes (padded), as
    SPD fills the slices between clicks, and what the decoder finds in that box is added."""
    shape = mask.shape[1:]
    pad = probes.pad_mm / np.asarray(pixel_mm, dtype=float)
    near, far = _bbox(part), _bbox(mask[end])
    step = 1 if end > s else -1
    for t in range(s + step, end, step):
        if out[t].any() or mask[t].any():
            continue
        w = (t - s) / (end - s)
        r0, c0, r1, c1 = (1 - w) * near + w * far
        box = (max(r0 - pad[0], 0.0), max(c0 - pad[1], 0.0), min(r1 + pad[0], shape[0] - 1.0),
               min(c1 + pad[1], shape[1] - 1.0))
        inside = np.zeros(shape, dtype=bool)
        inside[int(box[0]):int(np.ceil(box[2])) + 1, int(box[1]):int(np.ceil(box[3])) + 1] = True
        out[t] = segment(t, box) & inside & (True if blocked is None else ~blocked[t])


def follow(out: np.ndarray, part: np.ndarray, s: int, mask: np.ndarray, image: np.ndarray,
           segment: Callable[[int, tuple], np.ndarray], pixel_mm: Sequence[float], reach: int | tuple[int, int],
           blocked: np.ndarray | None = None, probes: ProbeConfig = ProbeConfig(),
           config: CorrectionConfig = CorrectionConfig(), bound: np.ndarray | None = None, size: int = 0) -> None:
    """Track ``part`` (slice ``s``) onto the adjacent slices in both directions, writing into ``out`` what each adds
    to ``mask``: each slice is decoded in the box around the part on the slice before (padded), and the walk stops
    where the part vanishes, stops overlapping the previous one, grows too fast, changes intensity, or is already
    in the mask, or ``reach`` slices on (one number, or (down, up)). ``bound`` (H, W): where the part may lie on
    every slice. ``size``: the structure's largest slice area nearby; a part smaller than that may grow toward
    it (a click often starts the walk from a small part of a slice) without ending the walk."""
    pad = np.ceil(probes.pad_mm / np.asarray(pixel_mm, dtype=float))
    values = image[s][part]
    mean, tolerance = float(values.mean()), max(config.max_shift * float(values.std()), config.min_shift)
    for step, far in zip((-1, 1), np.broadcast_to(reach, 2)):
        previous = part
        for t in range(s + step, s + step * (int(far) + 1), step):
            if not 0 <= t < mask.shape[0]:
                break
            labels, _ = ndimage.label(segment(t, padded_box(previous, pad)))
            found = np.isin(labels, np.unique(labels[previous & (labels > 0)]))
            if bound is not None:
                found &= bound
            area = int(found.sum())
            if (area == 0 or (found & previous).sum() < config.min_overlap * area
                    or area > config.max_growth * max(int(previous.sum()), size)
                    or abs(image[t][found].mean() - mean) > tolerance):
                break
            new = found & ~mask[t] & (True if blocked is None else ~blocked[t])
            if new.sum() < config.min_new * area:
                break  # the mask already holds the structure here
            out[t], previous = new, found


def _part_holding(mask: np.ndarray, point: np.ndarray) -> np.ndarray:
    """The connected part of a slice mask that holds ``point`` (the nearest part when none does; a 3 x 3 patch at
    the point when the mask is empty, so the click itself is always covered)."""
    r, c = (int(round(v)) for v in point)
    labels, count = ndimage.label(mask)
    if count == 0:
        patch = np.zeros(mask.shape, dtype=bool)
        patch[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = True
        return patch
    if not labels[r, c]:
        _, (ri, ci) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        r, c = ri[r, c], ci[r, c]
    return labels == labels[r, c]


def _bbox(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([rows.min(), cols.min(), rows.max(), cols.max()], dtype=float)


def _disc(shape, centre: np.ndarray, radius: float) -> np.ndarray:
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2
