"""Parse and validate the point prompts that viewers send (voxel indices, IJK)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

MAX_POINTS = 1000


class PromptError(ValueError):
    """A request's prompts are malformed; the message says what is wrong."""


@dataclass(frozen=True)
class Click:
    """One point prompt in voxel indices of the image as stored."""

    ijk: tuple[int, int, int]
    positive: bool


@dataclass(frozen=True)
class SliceClick:
    """A click expressed in slice coordinates: slice index and (row, col) inside the slice."""

    slice: int
    row: float
    col: float
    positive: bool
    source: int  # index of the originating click in the request (-1 for added prompts)


def _parse_point(value: Any, name: str, index: int, shape: Sequence[int]) -> tuple[int, int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise PromptError(f"{name}[{index}] must be a list of three voxel indices [i, j, k], got {value!r}")
    ijk = []
    for axis, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PromptError(f"{name}[{index}] has a non-numeric coordinate {v!r}")
        if not math.isfinite(v):
            raise PromptError(f"{name}[{index}] has a non-finite coordinate {v!r}")
        if float(v) != round(float(v)):
            raise PromptError(f"{name}[{index}] coordinate {v!r} is not an integer voxel index")
        iv = int(round(float(v)))
        if not 0 <= iv < shape[axis]:
            raise PromptError(
                f"{name}[{index}] = {list(value)} lies outside the image (shape {list(shape)}, axis {axis})"
            )
        ijk.append(iv)
    return ijk[0], ijk[1], ijk[2]


def parse_points(value: Any, name: str, shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """Validate a list of ``[i, j, k]`` points against an image shape.

    Args:
        value: the request field (``None`` or a list of 3-element lists).
        name: field name used in error messages.
        shape: the image shape (I, J, K).

    Raises:
        PromptError: wrong nesting, non-integer or non-finite values, points outside the image,
            or more than ``MAX_POINTS`` points.
    """
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"{name} must be a list of [i, j, k] points, got {type(value).__name__}")
    if len(value) > MAX_POINTS:
        raise PromptError(f"{name} has {len(value)} points; at most {MAX_POINTS} are accepted")
    return [_parse_point(p, name, n, shape) for n, p in enumerate(value)]


def parse_clicks(params: dict, shape: Sequence[int], box: bool = False) -> list[Click]:
    """Read ``foreground`` and ``background`` from request params; with ``box`` (an roi was given, which is the
    prompt then) no foreground click is needed.

    Raises:
        PromptError: if the fields are malformed or no foreground click is given (and no box).
    """
    if len(shape) != 3:
        raise PromptError(f"expected a 3D image, got shape {list(shape)}")
    fg = parse_points(params.get("foreground"), "foreground", shape)
    bg = parse_points(params.get("background"), "background", shape)
    clicks = [Click(p, True) for p in fg] + [Click(p, False) for p in bg]
    require_foreground(clicks, box)
    return clicks


def require_foreground(clicks: Sequence[Click], prompted: bool = False) -> None:
    """Raises PromptError unless a click is positive or the request has another prompt (``prompted``: an roi box,
    or a result its clicks correct)."""
    if not prompted and not any(c.positive for c in clicks):
        raise PromptError("at least one foreground point (or an roi box) is needed")


def slice_axes(shape: Sequence[int]) -> list[int]:
    """The axes whose slices are 2D: both other axes longer than one voxel (a 64x64x1 volume: [2])."""
    return [a for a in range(3) if all(shape[b] > 1 for b in range(3) if b != a)]


def coarsest_axis(spacing: Sequence[float], axes: Sequence[int] = (0, 1, 2)) -> int:
    """Of ``axes``, the one with the coarsest spacing (the acquisition direction); ties go to the last."""
    return max(axes, key=lambda a: (float(spacing[a]), a))


def training_axis(spacing: Sequence[float], shape: Sequence[int] | None = None) -> int:
    """The coarsest axis (the last one on ties), of those with 2D slices given the ``shape``: the one the infer
    side embeds in the background."""
    return coarsest_axis(spacing, (0, 1, 2) if shape is None else slice_axes(shape))


def choose_slice_axis(clicks: Sequence[Click], spacing: Sequence[float], requested: Any = None,
                      shape: Sequence[int] | None = None) -> int:
    """The axis to segment along: the one the clicks were placed on, as a stack of slices.

    An explicit ``slice_axis`` wins. Otherwise the clicks (positive and negative) say which view
    they came from: in a Slicer or OHIF view every click sits on a slice of the view's axis, one or a
    few per slice, every few slices, so along that axis their indices are distinct and share a
    regular step, while in-plane they scatter (see :func:`stack_evidence`). Clicks all on one slice
    of a single axis were made on that slice. One off-target click cannot flip the choice: it
    changes the in-plane spread, not the stack. A single click falls back to the axis with the
    coarsest spacing (the acquisition direction). Given the image ``shape``, only axes with 2D
    slices are chosen (see :func:`slice_axes`): a single-slice volume is segmented in its one slice.

    Raises:
        PromptError: ``requested`` is not 0, 1 or 2, or (with ``shape``) its slices or those of
            every axis are one voxel wide.
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested not in (0, 1, 2):
            raise PromptError(f"slice_axis must be 0, 1 or 2, got {requested!r}")
    axes = [0, 1, 2] if shape is None else slice_axes(shape)
    if not axes:
        raise PromptError(f"the image (shape {list(shape)}) has no 2D slices to segment: "
                          "at least two of its axes must be longer than one voxel")
    if requested is not None:
        if requested not in axes:
            rows, cols = (int(shape[b]) for b in range(3) if b != requested)
            raise PromptError(f"slice_axis {requested} gives slices of {rows}x{cols} voxels in an image of shape "
                              f"{list(shape)}; use slice_axis {' or '.join(map(str, axes))}")
        return requested
    points = np.array([c.ijk for c in clicks], dtype=np.int64).reshape(-1, 3)
    if len(np.unique(points, axis=0)) < 2:
        return coarsest_axis(spacing, axes)
    on_one_slice = [a for a in axes if np.unique(points[:, a]).size == 1]
    if len(on_one_slice) == 1:
        return on_one_slice[0]
    return max(axes, key=lambda a: (*stack_evidence(points[:, a], float(spacing[a])), -a))


def stack_evidence(values: np.ndarray, spacing_mm: float) -> tuple[float, float, float]:
    """How much clicks' indices along one axis look like a viewer's stack of slices, as a sort key.

    1. The step: ``(n - 2) * ln(g)`` for ``n`` distinct indices whose gaps share the common divisor
       ``g`` (chance gives this about once in ``g ** (n - 2)`` for scattered in-plane coordinates;
       skipped slices keep the divisor). 0 with fewer than three distinct indices or ``g`` = 1.
    2. Distinctness: the share of clicks on an index of their own (in-plane coordinates repeat).
    3. The spread: interquartile range in mm, which one outlier does not move.
    """
    distinct = np.unique(values)
    step = int(np.gcd.reduce(np.diff(distinct))) if distinct.size > 1 else 0
    bits = (distinct.size - 2) * float(np.log(step)) if distinct.size >= 3 and step > 1 else 0.0
    q1, q3 = np.percentile(values.astype(float), [25, 75])
    return bits, distinct.size / values.size, float(q3 - q1) * spacing_mm


def medial_point(mask2d: np.ndarray) -> tuple[int, int]:
    """The pixel deepest inside a 2D mask (a centre-line point)."""
    depth = ndimage.distance_transform_edt(mask2d)
    return tuple(int(v) for v in np.unravel_index(np.argmax(depth), depth.shape))


def to_slice_clicks(clicks: Sequence[Click], axis: int) -> list[SliceClick]:
    """Express clicks as (slice, row, col) with rows and columns the remaining axes in order."""
    in_plane = [a for a in range(3) if a != axis]
    return [
        SliceClick(c.ijk[axis], float(c.ijk[in_plane[0]]), float(c.ijk[in_plane[1]]), c.positive, n)
        for n, c in enumerate(clicks)
    ]


def parse_roi(value: Any, shape: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
    """Parse an optional ROI: ``[[i0, i1], [j0, j1], [k0, k1]]`` or ``[i0, j0, k0, i1, j1, k1]``."""
    if value is None or value == []:
        return None
    flat = np.asarray(value, dtype=object).ravel().tolist() if isinstance(value, (list, tuple)) else None
    if flat is None or len(flat) != 6 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        raise PromptError(f"roi must be [[i0, i1], [j0, j1], [k0, k1]] or six numbers, got {value!r}")
    if not all(math.isfinite(v) for v in flat):
        raise PromptError("roi has non-finite values")
    nested = isinstance(value[0], (list, tuple))
    lo = flat[0::2] if nested else flat[:3]
    hi = flat[1::2] if nested else flat[3:]
    roi = []
    for axis, (a, b) in enumerate(zip(lo, hi)):
        a, b = sorted((int(round(a)), int(round(b))))
        a, b = max(a, 0), min(b, shape[axis] - 1)
        if a > b:
            raise PromptError(f"roi does not overlap the image along axis {axis}")
        roi.append((a, b))
    return tuple(roi)
