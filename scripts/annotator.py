"""A family of simulated annotators for benchmarks, kept apart from the clicks that training simulates.

An annotator scrolls through a volume along one view axis and drops a rough click every few slices
near the structure's medial point. Some clicks drift, some slices are skipped, and some clicks land
off target: on any other labelled structure or on background within reach of the target. Every
figure made with these clicks is from a *simulated* annotator.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from lib.spd.method.prompts import medial_point


@dataclass(frozen=True)
class Annotator:
    """How one simulated annotator clicks.

    Args:
        every: one click every ``every`` slices.
        drift_mm: RMS in-plane distance of a click from the medial point.
        off_target: fraction of clicks that land off the structure.
        reach_mm: off-target clicks land within this distance of the medial point.
        skip: probability that a slice due for a click is skipped.
        view: the axis scrolled along (2 axial, 1 coronal, 0 sagittal for RAS-like volumes).
    """

    every: int = 3
    drift_mm: float = 3.0
    off_target: float = 0.15
    reach_mm: float = 15.0
    skip: float = 0.0
    view: int = 2

    def but(self, **changes) -> "Annotator":
        return replace(self, **changes)

    def describe(self) -> str:
        names = {0: "sagittal", 1: "coronal", 2: "axial"}
        return (f"every {self.every}, drift {self.drift_mm:g} mm, off {self.off_target:.0%}, skip {self.skip:.0%}, "
                f"{names[self.view]}")


def clicks_for(labels: np.ndarray, value: int, spacing, annotator: Annotator, rng: np.random.Generator
               ) -> tuple[list[list[int]], list[bool]]:
    """Clicks ([i, j, k] voxel indices) on structure ``value`` of a label map, and which ones are off target."""
    axis = annotator.view
    in_plane = [a for a in range(3) if a != axis]
    pixel_mm = np.array([spacing[a] for a in in_plane], dtype=float)
    target = labels == value
    present = np.flatnonzero(target.any(axis=tuple(in_plane)))
    assert present.size, f"label {value} is empty"
    clicks, off = [], []
    for s in range(present[0] + int(rng.integers(0, annotator.every)), present[-1] + 1, annotator.every):
        plane = np.take(target, s, axis=axis)
        if not plane.any() or rng.random() < annotator.skip:
            continue
        point = np.array(medial_point(plane), dtype=float)
        wrong = rng.random() < annotator.off_target
        if wrong:
            point = _off_target(np.take(labels, s, axis=axis), value, point, pixel_mm, annotator.reach_mm, rng)
        else:
            point = point + rng.normal(0.0, annotator.drift_mm / np.sqrt(2.0), 2) / pixel_mm
        row, col = np.clip(np.round(point), 0, np.array(plane.shape) - 1).astype(int)
        ijk = [0, 0, 0]
        ijk[axis], ijk[in_plane[0]], ijk[in_plane[1]] = int(s), int(row), int(col)
        clicks.append(ijk)
        off.append(bool(wrong))
    if not clicks:  # every due slice skipped: one click on the middle slice
        annotator = annotator.but(skip=0.0, every=max(1, present.size))
        return clicks_for(labels, value, spacing, annotator, rng)
    return clicks, off


def _off_target(plane_labels: np.ndarray, value: int, centre: np.ndarray, pixel_mm: np.ndarray, reach_mm: float,
                rng: np.random.Generator) -> np.ndarray:
    """A pixel outside the target within ``reach_mm`` of ``centre``: on another structure half of the time
    when one is in reach, else on background."""
    rr, cc = np.indices(plane_labels.shape)
    near = np.hypot((rr - centre[0]) * pixel_mm[0], (cc - centre[1]) * pixel_mm[1]) <= reach_mm
    other = near & (plane_labels != value) & (plane_labels != 0)
    background = near & (plane_labels == 0)
    pool = other if other.any() and (rng.random() < 0.5 or not background.any()) else background
    if not pool.any():
        return centre
    rows, cols = np.nonzero(pool)
    pick = int(rng.integers(rows.size))
    return np.array([rows[pick], cols[pick]], dtype=float)


def corrective_click(mask: np.ndarray, truth: np.ndarray, spacing, rng: np.random.Generator | None = None
                     ) -> tuple[list[int], bool] | None:
    """The next click of the interactive-segmentation protocol: at the deepest point (in mm) of the largest 3D
    error region, positive where the mask missed the structure and negative where it leaked; None when the mask is
    exact. With ``rng``, a less careful annotator: a random point of the region's inner half (at least half the
    deepest point's depth)."""
    best = None
    for positive, error in ((True, truth & ~mask), (False, mask & ~truth)):
        labels, count = ndimage.label(error)
        if count:
            sizes = np.bincount(labels.ravel())[1:]
            n = int(np.argmax(sizes)) + 1
            if best is None or sizes[n - 1] > best[0]:
                best = (sizes[n - 1], positive, labels == n)
    if best is None:
        return None
    _, positive, region = best
    box = tuple(slice(max(int(a.min()) - 1, 0), int(a.max()) + 2) for a in np.nonzero(region))
    depth = ndimage.distance_transform_edt(region[box], sampling=spacing)
    if rng is None:
        offset = np.unravel_index(int(np.argmax(depth)), depth.shape)
    else:
        inner = np.argwhere(depth >= depth.max() / 2)
        offset = inner[rng.integers(len(inner))]
    return [int(o + b.start) for o, b in zip(offset, box)], positive
