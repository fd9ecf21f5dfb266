"""3D assembly: per-slice masks back into a volume that keeps only what the prompts support."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy import ndimage


def trim_unanchored_ends(
    masks: np.ndarray,
    first_slice: int,
    anchored: tuple[int, int],
    support: np.ndarray | None = None,
    min_overlap: float = 0.5,
    max_growth: float = 1.3,
    min_support: float = 0.5,
) -> np.ndarray:
    """Drop slices beyond the validated clicks where the structure has ended.

    Walking outwards from the first/last slice with a validated click, a slice is kept while its
    mask overlaps the previous kept one (``min_overlap`` of its own area), does not grow by more
    than ``max_growth`` and, when ``support`` is given, keeps at least ``min_support`` of the
    support that the anchored range has (median); the walk stops at the first slice that fails.

    Args:
        masks: (N, H, W) bool masks of slices ``first_slice .. first_slice + N - 1``.
        first_slice: slice index of ``masks[0]``.
        anchored: (first, last) slice index that carries a validated click.
        support: (N,) evidence that each slice's mask is the target (e.g. mean saliency inside it).
    """
    out = masks.copy()
    lo, hi = anchored[0] - first_slice, anchored[1] - first_slice
    floor = -np.inf if support is None else min_support * float(np.median(support[lo : hi + 1]))
    for start, stop, step in ((lo, -1, -1), (hi, masks.shape[0], 1)):
        previous = out[start]
        ended = False
        for n in range(start + step, stop, step):
            area = out[n].sum()
            if not ended:
                overlap = np.logical_and(out[n], previous).sum()
                ended = (area == 0 or overlap < min_overlap * area or area > max_growth * max(previous.sum(), 1)
                         or (support is not None and support[n] < floor))
            if ended:
                out[n] = False
            else:
                previous = out[n]
    return out


def keep_prompted_components(volume: np.ndarray, seeds: Iterable[tuple[int, int, int]]) -> np.ndarray:
    """Keep the 3D connected components (26-connectivity) that contain a seed voxel.

    When no seed lies inside the mask (a prompt just off the predicted boundary), the component
    nearest to the seeds is kept rather than nothing. Labelling runs on the bounding box of the
    mask and the seeds only, which is all that can change.
    """
    seeds = np.asarray(list(seeds), dtype=int).reshape(-1, 3)
    box = bounding_box(volume, seeds, axes=(0, 1, 2))
    if box is None:
        return volume.astype(bool)
    out = np.zeros(volume.shape, dtype=bool)
    out[box] = _keep_seeded(volume[box], seeds - [b.start for b in box])
    return out


def bounding_box(mask: np.ndarray, points: np.ndarray, axes: tuple[int, ...]) -> tuple[slice, ...] | None:
    """Along each of ``axes``, the smallest range holding every True voxel of ``mask`` and every point
    (``points``: (n, mask.ndim) indices); None when the mask is empty."""
    bounds = []
    for axis in axes:
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if occupied.size == 0:
            return None
        lo, hi = occupied[0], occupied[-1]
        if len(points):
            lo, hi = min(lo, points[:, axis].min()), max(hi, points[:, axis].max())
        bounds.append(slice(int(lo), int(hi) + 1))
    return tuple(bounds)


def _keep_seeded(volume: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(volume, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return volume.astype(bool)
    hit = set(labels[tuple(seeds.T)].tolist()) - {0}
    if not hit:
        distance, (ii, jj, kk) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        hit = {int(labels[ii[tuple(s)], jj[tuple(s)], kk[tuple(s)]]) for s in seeds}
    keep = np.zeros(count + 1, dtype=bool)
    keep[list(hit)] = True
    return keep[labels]
