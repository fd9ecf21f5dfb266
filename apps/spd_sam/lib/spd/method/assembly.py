"""3D assembly: per-slice masks back into a volume that keeps only what the prompts support.

Torch on whatever device the masks are on (a GPU keeps them there from decoding to the one copy of the
result), with a handful of synchronisations per call: none per slice.
"""

from __future__ import annotations

import torch

RECONSTRUCTION_CHECK = 8  # dilations between two looks at whether the kept region still grows


def trim_unanchored_ends(
    masks: torch.Tensor,
    first_slice: int,
    anchored: tuple[int, int],
    support: torch.Tensor | None = None,
    min_overlap: float = 0.5,
    max_growth: float = 1.3,
    min_support: float = 0.5,
) -> torch.Tensor:
    """Drop slices beyond the validated clicks where the structure has ended.

    Walking outwards from the first/last slice with a validated click, a slice is kept while its
    mask overlaps the previous one (``min_overlap`` of its own area), does not grow by more than
    ``max_growth`` and, when ``support`` is given, keeps at least ``min_support`` of the support that
    the anchored range has (median); the walk stops at the first slice that fails. Since every slice
    after that one goes too, each slice is judged against its neighbour in one pass.

    Args:
        masks: (N, H, W) bool masks of slices ``first_slice .. first_slice + N - 1``.
        first_slice: slice index of ``masks[0]``.
        anchored: (first, last) slice index that carries a validated click.
        support: (N,) evidence that each slice's mask is the target (e.g. mean saliency inside it).
    """
    lo, hi = anchored[0] - first_slice, anchored[1] - first_slice
    area = masks.flatten(1).sum(1).double()
    overlap = (masks[1:] & masks[:-1]).flatten(1).sum(1).double()  # overlap[n]: slices n and n + 1
    ends_below = (area[:lo] == 0) | (overlap[:lo] < min_overlap * area[:lo]) | (
        area[:lo] > max_growth * area[1:lo + 1].clamp_min(1))
    ends_above = (area[hi + 1:] == 0) | (overlap[hi:] < min_overlap * area[hi + 1:]) | (
        area[hi + 1:] > max_growth * area[hi:-1].clamp_min(1))
    if support is not None:
        floor = min_support * torch.quantile(support[lo:hi + 1].double(), 0.5)  # the median, as numpy takes it
        ends_below |= support[:lo] < floor
        ends_above |= support[hi + 1:] < floor
    keep = torch.ones(len(masks), dtype=torch.bool, device=masks.device)
    keep[:lo] = ends_below.flip(0).cumsum(0).flip(0) == 0
    keep[hi + 1:] = ends_above.cumsum(0) == 0
    return masks & keep[:, None, None]


def keep_prompted_components(volume: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Keep the 3D connected components (26-connectivity) that contain a seed voxel.

    When no seed lies inside the mask (a prompt just off the predicted boundary), the component
    nearest to the seeds is kept rather than nothing. Works on the bounding box of the mask and the
    seeds only, which is all that can change.

    Args:
        volume: (D, H, W) bool.
        seeds: (n, 3) voxel indices.
    """
    seeds = torch.as_tensor(seeds, dtype=torch.long, device=volume.device).reshape(-1, 3)
    box = bounding_box(volume, seeds, axes=(0, 1, 2))
    if box is None:
        return volume.clone()
    out = torch.zeros_like(volume)
    out[box] = _keep_seeded(volume[box], seeds - torch.tensor([b.start for b in box], device=volume.device))
    return out


def bounding_box(mask: torch.Tensor, points: torch.Tensor, axes: tuple[int, ...]) -> tuple[slice, ...] | None:
    """Along each of ``axes``, the smallest range holding every True voxel of ``mask`` and every point
    (``points``: (n, mask.ndim) indices); None when the mask is empty."""
    if not bool(mask.any()):
        return None
    spans = []
    for axis in axes:
        occupied = mask.any(dim=tuple(a for a in range(mask.ndim) if a != axis)) if mask.ndim > 1 else mask
        last = len(occupied) - 1 - occupied.flip(0).int().argmax()
        spans.append(torch.stack([occupied.int().argmax(), last]))
    bounds = torch.stack(spans)
    if len(points):
        picked = points[:, list(axes)]
        bounds = torch.stack([torch.minimum(bounds[:, 0], picked.min(0).values),
                              torch.maximum(bounds[:, 1], picked.max(0).values)], dim=1)
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in bounds.tolist())


def _keep_seeded(volume: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """What ``volume`` connects to ``seeds`` (:func:`reconstruct`); seeds outside it all miss: then its voxels
    nearest to them start the growth."""
    marker = torch.zeros_like(volume)
    marker[tuple(seeds.T)] = True
    marker &= volume
    if not bool(marker.any()):
        inside = torch.nonzero(volume)
        nearest = torch.stack([(inside - seed).square().sum(1).argmin() for seed in seeds])  # one seed at a time:
        marker[tuple(inside[nearest].T)] = True  # a (seeds x voxels) table of a noisy mask would not fit
    return reconstruct(marker, volume, axes=(0, 1, 2))


def reconstruct(marker: torch.Tensor, mask: torch.Tensor, axes: tuple[int, ...], cross: bool = False) -> torch.Tensor:
    """What of ``mask`` connects to ``marker`` (a part of it) along ``axes``: ``marker`` grown by dilation within
    ``mask`` until it stops growing (morphological reconstruction). Neighbours share a corner (26-connectivity in
    3D, 8 in 2D), or a face when ``cross`` (6 in 3D, 4 in 2D); other axes hold separate stacks of masks."""
    count = -1
    while True:
        for _ in range(RECONSTRUCTION_CHECK):
            marker = _dilate(marker, axes, cross).logical_and_(mask)
        grown = int(marker.sum())  # the region only grows: the same count means nothing changed
        if grown == count:
            return marker
        count = grown


def _dilate(mask: torch.Tensor, axes: tuple[int, ...], cross: bool) -> torch.Tensor:
    """One step of dilation along ``axes`` by a cube (one voxel along each axis in turn), or by a cross (one
    voxel along any one axis) when ``cross``."""
    grown = mask
    for axis in axes:
        source, grown = (mask if cross else grown), grown.clone()
        size = mask.shape[axis]
        if size > 1:
            grown.narrow(axis, 1, size - 1).logical_or_(source.narrow(axis, 0, size - 1))
            grown.narrow(axis, 0, size - 1).logical_or_(source.narrow(axis, 1, size - 1))
    return grown
