"""A box as the prompt, as SAM users give one: Slicer's ROI with no clicks, or a box drawn on one slice.

A box spanning several slices is the box prompt of each of them, and nothing is segmented outside
it. A box on one slice segments that slice, and the structure is followed from it onto the adjacent
slices as far as it stays coherent (``corrections.follow``), wherever it goes in-plane.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..runtime.backbones import PromptBatch
from .assembly import keep_prompted_components
from .corrections import CorrectionConfig, follow
from .intensity import IntensityWindow
from .pipeline import Segmentation, SPDPipeline, VolumeView
from .prompts import slice_axes, training_axis

FOLLOW_MM = 60.0  # how far a one-slice box is followed on either side


def box_axis(roi: Sequence[tuple[int, int]], spacing: Sequence[float], shape: Sequence[int],
             requested: int | None = None) -> int:
    """The slice axis of a box: the requested one, else the axis it is one slice thick along, else the coarsest."""
    if requested is not None:
        return requested
    thin = [a for a in slice_axes(shape) if roi[a][0] == roi[a][1]]
    return thin[0] if len(thin) == 1 else training_axis(spacing, shape)


def segment_box(pipeline: SPDPipeline, volume: np.ndarray, spacing: Sequence[float], volume_id: str,
                window: IntensityWindow, roi: Sequence[tuple[int, int]], slice_axis: int | None = None,
                config: CorrectionConfig = CorrectionConfig()) -> Segmentation:
    """Segment the structure in ``roi`` (inclusive voxel bounds per axis) from the box alone."""
    axis = box_axis(roi, spacing, volume.shape, slice_axis)
    view = VolumeView(volume, axis, window)
    (r0, r1), (c0, c1) = (roi[a] for a in view.in_plane)
    first, last = roi[axis]
    box = np.array([r0, c0, r1, c1], dtype=np.float32)
    slices = list(range(first, last + 1))
    masks = pipeline.decode_slices(volume_id, view, slices, PromptBatch(boxes=np.tile(box, (len(slices), 1))))
    stack = np.zeros((view.depth, *view.slice_shape), dtype=bool)
    stack[first:last + 1] = masks
    pixel_mm = [float(spacing[a]) for a in view.in_plane]
    centre = ((r0 + r1) // 2, (c0 + c1) // 2)
    if first == last and masks[0].any():
        reach = int(round(FOLLOW_MM / float(spacing[axis])))
        lo, hi = max(first - reach, 0), min(first + reach + 1, view.depth)
        image = np.zeros(stack.shape, dtype=np.float32)
        image[lo:hi] = view.slices(range(lo, hi))
        decode = lambda t, b: pipeline.decode_slices(volume_id, view, [t], PromptBatch(boxes=np.array([b])))[0]  # noqa: E731
        follow(stack, masks[0], first, np.zeros_like(stack), image, decode, pixel_mm, reach, config=config)
        centre = tuple(int(v) for v in np.argwhere(masks[0]).mean(axis=0).round())
    inside = np.zeros(view.slice_shape, dtype=bool)
    inside[r0:r1 + 1, c0:c1 + 1] = True
    stack[first:last + 1] &= inside  # the slices followed beyond a one-slice box go where the structure goes
    seeds = [(first + n, *centre) for n in range(len(slices))]
    if stack.any():
        stack = keep_prompted_components(torch.from_numpy(stack), torch.tensor(seeds)).numpy()
    mask = np.moveaxis(stack, 0, axis)
    occupied = np.flatnonzero(stack.any(axis=(1, 2)))
    span = (int(occupied[0]), int(occupied[-1])) if occupied.size else (first, last)
    record = {"kept": [], "moved": [], "rejected": [], "added": [], "box": [list(b) for b in roi]}
    return Segmentation(np.ascontiguousarray(mask), axis, span, record, saliency="none (box prompt)",
                        box_probes="the box given")
