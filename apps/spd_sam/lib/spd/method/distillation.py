"""Contextual Prompt Distillation (CPD): rough clicks in, consensus prompts per slice out.

Every foreground click is checked twice (dual validation): against the saliency map of its own
slice, and against the centre line that the clicks on nearby slices draw (a robust Theil-Sen
line per in-plane coordinate). A click is kept unless the evidence clearly contradicts it: the
line judges a click only where at least four other clicked slices draw it, and only beyond a
distance that grows with how far the click lies from them (a line extrapolated from two drifting
clicks says little). Beyond the outermost other clicks the line is extrapolated along a structure
that may curve, so there a salient click is kept whatever the line says. A click off the line is
moved to the salient pixel nearest to where the line points, rejected when neither it nor anything
near the line is salient, and kept when it is salient and nothing near the line is. Slices between
validated clicks get prompts interpolated from their neighbours. Box extents measured on the
validated slices (see ``box_probing``) are carried to the slices between them and smoothed across
adjacent slices.

The saliency searches (is a click salient, which salient pixel is nearest to a point) run batched in
torch on the saliency's device: one batch per kind of search across the clicks, one across the slices
between them, so a request waits on the device a few times, not once per click or slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch
from scipy import ndimage

from .prompts import SliceClick


@dataclass(frozen=True)
class CPDConfig:
    """Tolerances of the distillation, in mm where they are lengths."""

    saliency_threshold: float = 0.5
    centreline_tolerance_mm: float = 7.0
    snap_radius_mm: float = 4.0
    neighbours: int = 6
    min_line_clicks: int = 4  # other clicked slices needed before the line may judge a click


@dataclass
class ClickDecision:
    """What CPD did with one user click."""

    source: int
    slice: int
    row: float
    col: float
    status: str  # kept | moved | rejected
    reason: str
    new_row: float | None = None
    new_col: float | None = None

    def to_json(self, in_plane: Sequence[int], axis: int) -> dict:
        """The decision with the click in IJK voxel indices."""
        out = {"click": self.source, "ijk": _ijk(self.slice, self.row, self.col, in_plane, axis),
               "status": self.status, "reason": self.reason}
        if self.status == "moved":
            out["moved_to"] = _ijk(self.slice, self.new_row, self.new_col, in_plane, axis)
        return out


@dataclass
class SlicePrompt:
    """Consensus prompts for one slice (slice pixel coordinates, rows and columns)."""

    slice: int
    positives: list[tuple[float, float]]
    negatives: list[tuple[float, float]] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    anchored: bool = False  # True when a validated user click lies on this slice


@dataclass
class Consensus:
    """The consensus prompt set of a request and the record of decisions."""

    prompts: dict[int, SlicePrompt]
    decisions: list[ClickDecision]

    @property
    def anchored_range(self) -> tuple[int, int]:
        anchored = [s for s, p in self.prompts.items() if p.anchored]
        return min(anchored), max(anchored)

    def move_anchor(self, s: int, point, reason: str) -> None:
        """Put anchored slice ``s``'s prompt at ``point``; its validated clicks are recorded as moved there."""
        self.prompts[s].positives = [(float(point[0]), float(point[1]))]
        for d in self.decisions:
            if d.slice == s and d.status != "rejected":
                d.status, d.new_row, d.new_col, d.reason = "moved", float(point[0]), float(point[1]), reason

    def assign_boxes(self, anchor_boxes: dict[int, tuple[float, float, float, float]], smoothing: int = 3):
        """Give every slice a box.

        The boxes measured on the anchored slices lie where the decoder found the structure, whatever
        a click's drift inside it. Each coordinate is first validated against adjacent anchors
        (running median, so one bad measurement does not spread), then interpolated linearly to the
        slices between them and carried past the ends.
        """
        anchors = np.array(sorted(anchor_boxes))
        boxes = np.array([anchor_boxes[s] for s in anchors], dtype=float)
        if len(anchors) >= smoothing:
            boxes = ndimage.median_filter(boxes, size=(smoothing, 1), mode="nearest")
        for s, prompt in self.prompts.items():
            prompt.box = tuple(float(np.interp(s, anchors, boxes[:, m])) for m in range(4))

    def record(self, in_plane: Sequence[int], axis: int) -> dict:
        """JSON-ready record: kept / moved / rejected clicks with reasons, and added prompts."""
        by_status = {status: [d.to_json(in_plane, axis) for d in self.decisions if d.status == status]
                     for status in ("kept", "moved", "rejected")}
        by_status["added"] = [
            {"ijk": _ijk(p.slice, *p.positives[0], in_plane, axis), "reason": "interpolated from validated neighbours"}
            for p in self.prompts.values() if not p.anchored
        ]
        return by_status


def _ijk(slice_index: int, row: float, col: float, in_plane: Sequence[int], axis: int) -> list[int]:
    ijk = [0, 0, 0]
    ijk[axis], ijk[in_plane[0]], ijk[in_plane[1]] = int(slice_index), int(round(row)), int(round(col))
    return ijk


def theil_sen_predict(slices: np.ndarray, values: np.ndarray, at: float) -> float:
    """Robust line through (slice, value) pairs evaluated at ``at`` (median of pairwise slopes)."""
    if np.unique(slices).size < 2:
        return float(np.median(values))
    i, j = np.triu_indices(slices.size, k=1)
    keep = slices[i] != slices[j]
    slope = float(np.median((values[j][keep] - values[i][keep]) / (slices[j][keep] - slices[i][keep])))
    intercept = float(np.median(values - slope * slices))
    return intercept + slope * at


class _LineCheck(NamedTuple):
    """How a click lies to the line of the clicks on other slices: where the line puts it, how far from there it may
    lie and does lie (mm), and whether it agrees with the line."""

    expected: tuple[float, float]
    tolerance: float
    deviation: float
    agrees: bool


class ContextualPromptDistiller:
    """Turns weak clicks into a consensus prompt set.

    Args:
        pixel_mm: in-plane spacing (row, col) in mm.
        config: tolerances.
    """

    def __init__(self, pixel_mm: tuple[float, float], config: CPDConfig = CPDConfig()):
        self.pixel_mm = np.asarray(pixel_mm, dtype=float)
        self.config = config

    def distill(self, clicks: Sequence[SliceClick], saliency: torch.Tensor | np.ndarray,
                first_slice: int) -> Consensus:
        """Validate clicks and build prompts for every slice that ``saliency`` covers.

        Args:
            clicks: the request's clicks in slice coordinates.
            saliency: (N, H, W) maps in [0, 1] for slices ``first_slice .. first_slice + N - 1``: a tensor on any
                device (the searches run there) or a numpy array.
            first_slice: slice index of ``saliency[0]``.
        """
        saliency = torch.as_tensor(saliency).contiguous()  # the searches gather from the flat maps
        positives = [c for c in clicks if c.positive]
        decisions = self._validate(positives, saliency, first_slice)
        validated = [d for d in decisions if d.status != "rejected"]
        if not validated:  # nothing survived: trust the user's clicks rather than return nothing
            for d in decisions:
                d.status, d.reason = "kept", "kept: every click failed validation, so none is dropped"
            validated = decisions
        prompts = self._prompts_per_slice(validated, clicks, saliency, first_slice)
        return Consensus(prompts, decisions)

    def line_points(self, clicks: Sequence[SliceClick], shape: tuple[int, int]) -> list[tuple[int, float, float]]:
        """(slice, row, col) where the line of the other clicks puts the click of each clicked slice (kept inside
        slices of ``shape``), for slices with enough other clicked slices to draw it: clicks that drift scatter
        around a structure, and the line through them runs near its middle."""
        positives = [c for c in clicks if c.positive]
        out = []
        for s in sorted({c.slice for c in positives}):
            line = self._expected_position(next(c for c in positives if c.slice == s), positives)
            if line is not None:
                (row, col), _, _ = line
                out.append((s, min(max(row, 0.0), shape[0] - 1.0), min(max(col, 0.0), shape[1] - 1.0)))
        return out

    # -- dual validation -------------------------------------------------------------------
    def _validate(self, positives: Sequence[SliceClick], saliency: torch.Tensor,
                  first_slice: int) -> list[ClickDecision]:
        """One decision per click, from three batched saliency searches: at every click; around where the line points,
        for the clicks off it; around the click, for the others that are not salient."""
        cfg = self.config
        slices = [c.slice - first_slice for c in positives]
        salient = self._salient_at(saliency, slices, [(c.row, c.col) for c in positives])
        lines = [self._line_check(c, positives, s) for c, s in zip(positives, salient)]
        off_line = [n for n, line in enumerate(lines) if line and not line.agrees]
        unsalient = [n for n, line in enumerate(lines) if not salient[n] and (line is None or line.agrees)]
        targets = dict(zip(off_line, self._nearest_salient(saliency, [slices[n] for n in off_line],
                                                           [lines[n].expected for n in off_line],
                                                           cfg.centreline_tolerance_mm)))
        targets |= dict(zip(unsalient, self._nearest_salient(saliency, [slices[n] for n in unsalient],
                                                             [(positives[n].row, positives[n].col) for n in unsalient],
                                                             cfg.snap_radius_mm)))
        return [self._decide(c, salient[n], lines[n], targets.get(n)) for n, c in enumerate(positives)]

    def _line_check(self, click: SliceClick, positives: Sequence[SliceClick], salient: bool) -> _LineCheck | None:
        """How ``click`` lies to the line of the other clicks (None: too few of them to draw it). It agrees with the
        line within the tolerance, and anywhere beyond the outermost of them when it is salient."""
        line = self._expected_position(click, positives)
        if line is None:
            return None
        expected, tolerance, between = line
        deviation = self._distance_mm((click.row, click.col), expected)
        return _LineCheck(expected, tolerance, deviation, deviation <= tolerance or (salient and not between))

    def _decide(self, click: SliceClick, salient: bool, line: _LineCheck | None, target) -> ClickDecision:
        """Keep, move or reject ``click``, given whether it is salient, how it lies to the line, and ``target``: the
        salient pixel nearest to where the line points if the click is off the line, else nearest to the click if it
        is not salient (None: nothing salient there)."""
        cfg = self.config
        decision = ClickDecision(click.source, click.slice, click.row, click.col, "kept", "")
        agrees = None if line is None else line.agrees
        if agrees is False:
            off_line = (f"{line.deviation:.1f} mm off the line of the clicks on nearby slices (tolerance "
                        f"{line.tolerance:.1f} mm for this click)")
            if target is not None:
                decision.status, (decision.new_row, decision.new_col) = "moved", target
                decision.reason = (f"moved: {off_line}; moved within its slice to the salient pixel nearest to "
                                   f"where the line points")
            elif not salient:
                decision.status = "rejected"
                decision.reason = (f"rejected: {off_line}, not salient, and nothing salient within "
                                   f"{cfg.centreline_tolerance_mm:.0f} mm of where the line points")
            else:
                decision.reason = (f"kept: {off_line}, but salient, and nothing salient within "
                                   f"{cfg.centreline_tolerance_mm:.0f} mm of where the line points")
        elif salient and agrees is None:
            decision.reason = "kept: salient (too few clicks on other slices to draw a line)"
        elif salient and line.deviation <= line.tolerance:
            decision.reason = "kept: salient, and on the line of the clicks on nearby slices"
        elif salient:
            decision.reason = (f"kept: salient; {line.deviation:.1f} mm off the line of the clicks on nearby slices, "
                               f"but beyond the outermost of them, where the line is extrapolated")
        elif target is None:
            decision.reason = (f"kept: not salient, and nothing salient within {cfg.snap_radius_mm:.0f} mm, "
                               + ("but on the line of the clicks on nearby slices" if agrees
                                  else "with too few clicks on other slices to draw a line"))
        else:
            decision.status, (decision.new_row, decision.new_col) = "moved", target
            decision.reason = (f"moved: not salient at the click; snapped "
                               f"{self._distance_mm((click.row, click.col), target):.1f} mm within its slice to "
                               f"the nearest salient pixel" + (", on the line of the clicks on nearby slices"
                                                               if agrees else ""))
        return decision

    def _expected_position(self, click: SliceClick, positives: Sequence[SliceClick]):
        """Where the line of the nearby clicks puts this click, how far from there it may lie, and whether the click
        lies between those clicks (else the line is extrapolated); None when fewer than ``min_line_clicks`` other
        slices are clicked (too few to tell a bad click from a bad line).

        The tolerance is ``centreline_tolerance_mm`` widened by the click's leverage (as a least-squares
        prediction's error grows away from the points that draw the line).
        """
        cfg = self.config
        others = [c for c in positives if c.slice != click.slice]
        if len({c.slice for c in others}) < cfg.min_line_clicks:
            return None
        others = sorted(others, key=lambda c: abs(c.slice - click.slice))[: cfg.neighbours]
        s = np.array([c.slice for c in others], dtype=float)
        expected = (theil_sen_predict(s, np.array([c.row for c in others]), click.slice),
                    theil_sen_predict(s, np.array([c.col for c in others]), click.slice))
        leverage = 1 / len(s) + (click.slice - s.mean()) ** 2 / max(float(((s - s.mean()) ** 2).sum()), 1e-9)
        tolerance = cfg.centreline_tolerance_mm * float(np.sqrt(1 + leverage))
        return expected, tolerance, bool(s.min() < click.slice < s.max())

    # -- consensus prompts -----------------------------------------------------------------
    def _prompts_per_slice(self, validated, clicks, saliency, first_slice) -> dict[int, SlicePrompt]:
        anchors: dict[int, list[tuple[float, float]]] = {}
        for d in validated:
            point = (d.new_row, d.new_col) if d.status == "moved" else (d.row, d.col)
            anchors.setdefault(d.slice, []).append(point)
        anchor_slices = np.array(sorted(anchors))
        centres = np.array([np.mean(anchors[s], axis=0) for s in anchor_slices])
        covered = range(first_slice, first_slice + saliency.shape[0])
        between = [s for s in covered if s not in anchors]
        guesses = [(float(row), float(col)) for row, col in zip(np.interp(between, anchor_slices, centres[:, 0]),
                                                                np.interp(between, anchor_slices, centres[:, 1]))]
        snapped = self._nearest_salient(saliency, [s - first_slice for s in between], guesses,
                                        self.config.snap_radius_mm)
        added = iter([point or guess for point, guess in zip(snapped, guesses)])
        prompts = {s: SlicePrompt(s, list(anchors[s]), anchored=True) if s in anchors else SlicePrompt(s, [next(added)])
                   for s in covered}
        for c in clicks:
            if not c.positive and c.slice in prompts:
                prompts[c.slice].negatives.append((c.row, c.col))
        return prompts

    # -- geometry helpers ------------------------------------------------------------------
    def _distance_mm(self, a, b) -> float:
        return float(np.hypot(*((np.asarray(a) - np.asarray(b)) * self.pixel_mm)))

    # -- saliency searches, batched on the saliency's device ------------------------------------
    def _salient_at(self, saliency: torch.Tensor, slices: Sequence[int], points) -> list[bool]:
        """Whether each point (rounded to its pixel) has a salient pixel within one pixel on its slice."""
        device = saliency.device
        pixel = torch.tensor([(int(round(row)), int(round(col))) for row, col in points], dtype=torch.long,
                             device=device).reshape(-1, 2)
        around = torch.arange(-1, 2, device=device)
        rows, cols = pixel[:, :1] + around, pixel[:, 1:] + around
        inside = _inside(rows, saliency.shape[1])[:, :, None] & _inside(cols, saliency.shape[2])[:, None, :]
        # compared in float64, as numpy compared the window's maximum (a scalar): the same pixels count for a
        # threshold that float32 cannot hold
        salient = _gather(saliency, slices, rows, cols).double() >= self.config.saliency_threshold
        return (inside & salient).flatten(1).any(1).tolist()

    def _nearest_salient(self, saliency: torch.Tensor, slices: Sequence[int], centres, radius_mm: float):
        """For each centre, the salient pixel of its slice nearest to it within ``radius_mm`` (the first in row-major
        order on ties), or None.

        Every search looks at the 2 * reach + 2 pixels per axis from floor(centre) - reach, which hold the disc's box
        (up to ceil(centre) + reach) whatever the centre's fraction; distances are in float64, so ties fall as they
        would in numpy.
        """
        device = saliency.device
        centre = torch.tensor(centres, dtype=torch.float64, device=device).reshape(-1, 2)
        start = centre.floor().long()
        reach = [math.ceil(radius_mm / mm) for mm in self.pixel_mm]
        rows = start[:, :1] - reach[0] + torch.arange(2 * reach[0] + 2, device=device)
        cols = start[:, 1:] - reach[1] + torch.arange(2 * reach[1] + 2, device=device)
        height, width = saliency.shape[1:]
        row_mm, col_mm = map(float, self.pixel_mm)
        # squared mm along each axis, infinite off the slice so that those pixels never count
        along_rows = torch.where(_inside(rows, height), ((rows - centre[:, :1]) * row_mm).square(), torch.inf)
        along_cols = torch.where(_inside(cols, width), ((cols - centre[:, 1:]) * col_mm).square(), torch.inf)
        salient = _gather(saliency, slices, rows, cols) >= self.config.saliency_threshold
        to_salient = torch.where(salient, along_rows[:, :, None] + along_cols[:, None, :], torch.inf).flatten(1)
        # the nearest salient pixel lies in the disc if any does; argmin gives the first of equals
        best = to_salient.argmin(1)
        found = to_salient.gather(1, best[:, None])[:, 0] <= radius_mm**2
        nearest = torch.stack([found.long(), rows[:, 0] + best // cols.shape[1], cols[:, 0] + best % cols.shape[1]], 1)
        return [(float(row), float(col)) if hit else None for hit, row, col in nearest.tolist()]


def _inside(index: torch.Tensor, size: int) -> torch.Tensor:
    """Which indices lie in 0 .. size - 1."""
    return (index >= 0) & (index < size)


def _gather(saliency: torch.Tensor, slices: Sequence[int], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The saliency (K, R, C) at ``rows`` (K, R) x ``cols`` (K, C) of slices ``slices``; a pixel off the slice reads
    the nearest one on it."""
    height, width = saliency.shape[1:]
    index = torch.tensor(slices, dtype=torch.long, device=saliency.device)[:, None, None]
    pixel = (index * height + rows.clamp(0, height - 1)[:, :, None]) * width + cols.clamp(0, width - 1)[:, None, :]
    # a flat index_select: on the CPU, advanced indexing spreads even a small gather over threads, at a cost of ms
    return saliency.view(-1).index_select(0, pixel.view(-1)).view(pixel.shape)
