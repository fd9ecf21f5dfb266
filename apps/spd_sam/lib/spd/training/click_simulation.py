"""Simulated clinical clicks: rough centre-line clicks every k slices, some drifting off target."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..method.prompts import medial_point


@dataclass(frozen=True)
class ClickStyle:
    """How an annotator clicks.

    Args:
        every: one click every ``every`` slices along the structure.
        drift_mm: RMS distance of a click from the structure's centre (in-plane).
        off_target: fraction of clicks placed on a neighbouring structure instead.
        off_target_mm: distance range of off-target clicks when no neighbour mask is given.
    """

    every: int = 3
    drift_mm: float = 3.0
    off_target: float = 0.15
    off_target_mm: tuple[float, float] = (10.0, 18.0)


def simulate_clicks(
    target: np.ndarray,
    spacing,
    axis: int,
    style: ClickStyle = ClickStyle(),
    rng: np.random.Generator | None = None,
    distractor: np.ndarray | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Clicks ([i, j, k] voxel indices) along ``target`` and whether each one was placed off target.

    Args:
        target: bool (I, J, K) mask of the structure.
        spacing: voxel size in mm.
        axis: the axis the annotator scrolls along.
        style: click habits.
        rng: random generator (a fresh default one if None).
        distractor: optional bool mask of a neighbouring structure that off-target clicks land on.
    """
    rng = rng or np.random.default_rng()
    in_plane = [a for a in range(3) if a != axis]
    pixel_mm = np.array([spacing[a] for a in in_plane], dtype=float)
    present = np.flatnonzero(target.any(axis=tuple(in_plane)))
    assert present.size, "the target mask is empty"
    start = present[0] + int(rng.integers(0, style.every))
    clicks, off = [], []
    for s in range(start, present[-1] + 1, style.every):
        plane = np.take(target, s, axis=axis)
        if not plane.any():
            continue
        point = np.array(medial_point(plane), dtype=float)
        wrong = rng.random() < style.off_target
        if wrong:
            point = _off_target_point(plane, point, pixel_mm, style, rng,
                                      None if distractor is None else np.take(distractor, s, axis=axis))
        else:
            point += rng.normal(0.0, style.drift_mm / np.sqrt(2.0), 2) / pixel_mm
        limits = np.array(plane.shape) - 1
        row, col = np.clip(np.round(point), 0, limits).astype(int)
        ijk = [0, 0, 0]
        ijk[axis], ijk[in_plane[0]], ijk[in_plane[1]] = int(s), int(row), int(col)
        clicks.append(ijk)
        off.append(bool(wrong))
    return clicks, off


def _off_target_point(plane, centre, pixel_mm, style, rng, distractor_plane) -> np.ndarray:
    if distractor_plane is not None and distractor_plane.any():
        return np.array(medial_point(distractor_plane), dtype=float)
    angle = rng.uniform(0, 2 * np.pi)
    distance = rng.uniform(*style.off_target_mm)
    return centre + distance * np.array([np.cos(angle), np.sin(angle)]) / pixel_mm
