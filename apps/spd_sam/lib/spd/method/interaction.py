"""Interaction sessions: one structure on one image, refined click by click.

Viewers resend every point of a segment with each run (3D Slicer's MONAI Label panel, OHIF's point
prompts). A request whose clicks are the previous request's clicks plus new ones is a correction:
the session keeps the previous result and its consensus, and only the new clicks act on it (see
``corrections``). Any other click list starts afresh with the full SPD pipeline. The same clicks
again return the session's result as it stands, unless that result is a draft (``draft.py``): any
request then starts afresh, and gets the full result once the slices it needs are embedded.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Hashable, Sequence

import numpy as np
import torch

from .assembly import keep_prompted_components
from .box_prompt import segment_box
from .corrections import ClickEffect, CorrectionConfig, leak_around, missed_around, uncontradicted
from .intensity import IntensityWindow
from .pipeline import Segmentation, SPDPipeline, VolumeView, click_gap
from .prompts import Click, medial_point


@dataclass
class Session:
    """What a structure's annotation has reached: its clicks, its mask and what corrections removed."""

    clicks: tuple[Click, ...]
    axis: int
    roi: tuple | None
    model_version: int | None
    segmentation: Segmentation
    removed: np.ndarray  # (volume shape) bool: voxels negative clicks took out; tracking does not add them back
    defenders: np.ndarray  # (n, 3) positive prompts (slice, row, col) on the session's axis
    gap: int  # typical slices between the annotator's clicks
    steps: int = 0
    effects: list[ClickEffect] = field(default_factory=list)
    label: str | None = None  # the structure's name (selects a trained saliency head)

    def new_clicks(self, clicks: Sequence[Click]) -> list[Click] | None:
        """The clicks ``clicks`` adds to this session's, in request order; None when it does not hold them all."""
        before, after = Counter(self.clicks), Counter(clicks)
        if any(after[c] < n for c, n in before.items()):
            return None
        extra = after - before
        out = []
        for c in clicks:
            if extra[c]:
                extra[c] -= 1
                out.append(c)
        return out


class SessionStore:
    """Sessions by key (image, label, client), least recently used dropped beyond ``capacity``, idle ones after
    ``idle_s``. Thread-safe."""

    def __init__(self, capacity: int = 32, idle_s: float = 3600.0):
        self.capacity, self.idle_s = capacity, idle_s
        self._items: OrderedDict[Hashable, tuple[float, Session]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Session | None:
        with self._lock:
            self._expire()
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: Hashable, session: Session) -> None:
        with self._lock:
            self._items[key] = (time.monotonic(), session)
            self._items.move_to_end(key)
            self._expire()
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (t, _) in self._items.items() if now - t > self.idle_s]:
            del self._items[key]


@dataclass
class Outcome:
    """A request's result: the segmentation and what the interaction did (``record`` goes into the result JSON)."""

    segmentation: Segmentation
    record: dict


class Interactions:
    """Runs requests as new sessions or corrections of the last one for the same key.

    Args:
        pipeline: the SPD pipeline (first results, embeddings and decoding for corrections).
        store: where sessions live.
        config: how corrections act.
    """

    def __init__(self, pipeline: SPDPipeline, store: SessionStore | None = None,
                 config: CorrectionConfig = CorrectionConfig()):
        self.pipeline, self.store, self.config = pipeline, store or SessionStore(), config

    def run(self, key: Hashable, volume: np.ndarray, spacing: Sequence[float], volume_id: str,
            clicks: Sequence[Click], window: IntensityWindow, label: str | None = None, slice_axis: int | None = None,
            roi=None, focus: bool = True, model_version: int | None = None, draft: bool = False) -> Outcome:
        """Segment from ``clicks``: a correction when they extend the session's clicks for ``key`` (same axis, roi
        and model), else afresh. Arguments as in :meth:`SPDPipeline.segment`."""
        session, new = self._continued(key, clicks, slice_axis, roi, model_version)
        if new == []:
            return Outcome(replace(session.segmentation, timings={}), self._record(session, "unchanged", []))
        if new is not None:
            return self._correct_and_record(key, session, volume, spacing, volume_id, new, window)
        if any(c.positive for c in clicks):
            seg = self.pipeline.segment(volume, spacing, volume_id, clicks, window, label, slice_axis, roi, focus, draft)
        else:  # the roi alone is the prompt; negative clicks with it correct the result
            seg = segment_box(self.pipeline, volume, spacing, volume_id, window, roi, slice_axis, self.config)
            session = Session((), seg.axis, roi, model_version, seg, np.zeros(volume.shape, dtype=bool),
                              _defenders(seg), 3, label=label)
            if clicks:
                return self._correct_and_record(key, session, volume, spacing, volume_id, list(clicks), window)
        session = Session(tuple(clicks), seg.axis, roi, model_version, seg, np.zeros(volume.shape, dtype=bool),
                          _defenders(seg), click_gap([c.ijk[seg.axis] for c in clicks if c.positive]), label=label)
        self.store.put(key, session)
        return Outcome(seg, self._record(session, "new", []))

    def continues(self, key: Hashable, clicks: Sequence[Click], slice_axis: int | None = None, roi=None,
                  model_version: int | None = None) -> bool:
        """Whether :meth:`run` would take ``clicks`` as a correction (or a repeat) of ``key``'s session."""
        return self._continued(key, clicks, slice_axis, roi, model_version)[1] is not None

    def _continued(self, key, clicks, slice_axis, roi, model_version) -> tuple[Session | None, list[Click] | None]:
        """``key``'s session and the clicks that ``clicks`` adds to it (None: they start a new session)."""
        session = self.store.get(key)
        same = (session is not None and session.roi == roi and session.model_version == model_version
                and (slice_axis is None or slice_axis == session.axis) and session.segmentation.draft is None)
        return session, (session.new_clicks(clicks) if same else None)

    def start_from(self, key: Hashable, seg: Segmentation, model_version: int | None, gap: int,
                   label: str | None = None) -> None:
        """Make ``seg`` (a result reached without clicks, e.g. an auto segmentation of ``label``, prompted every
        ``gap`` slices) the session of ``key``: the next clicks for it correct that result."""
        self.store.put(key, Session((), seg.axis, None, model_version, seg, np.zeros(seg.mask.shape, dtype=bool),
                                    _defenders(seg), gap, label=label))

    def _correct_and_record(self, key, session: Session, volume, spacing, volume_id, new: list[Click], window
                            ) -> Outcome:
        tic = time.perf_counter()
        previous = session.segmentation.mask
        session = self._correct(session, volume, spacing, volume_id, new, window)
        session.segmentation.timings = {"correct": round(time.perf_counter() - tic, 4)}
        self.store.put(key, session)
        record = self._record(session, "correction", session.effects[-len(new):])
        record.update(_change(previous, session.segmentation.mask, session.axis))
        return Outcome(session.segmentation, record)

    def _correct(self, session: Session, volume, spacing, volume_id, new: list[Click], window) -> Session:
        seg, axis = session.segmentation, session.axis
        stack = lambda a: np.moveaxis(a, axis, 0)  # noqa: E731  (a view: writes go to the volume)
        mask, removed = seg.mask.copy(), session.removed.copy()
        view = VolumeView(volume, axis, window, seg.focus)
        whole = view.focused(None)
        sp = (float(spacing[axis]), *(float(spacing[a]) for a in whole.in_plane))
        reach = max(int(round(self.config.reach_gaps * session.gap)), 1)
        defenders = session.defenders
        effects = []

        def head(slices: list[int]) -> np.ndarray | None:
            return self.pipeline.trained_saliency(volume_id, whole, session.label, slices)

        for click in new:
            point = (click.ijk[axis], *(click.ijk[a] for a in whole.in_plane))
            before = stack(mask).copy()
            lo, hi = max(point[0] - reach, 0), min(point[0] + reach + 1, whole.depth)
            image = np.zeros(before.shape, dtype=np.float32)
            image[lo:hi] = whole.slices(range(lo, hi))
            if click.positive:
                in_region = seg.focus is None or all(span.start <= p < span.stop for span, p in zip(seg.focus, point[1:]))
                target = view if in_region else whole
                region = missed_around(
                    stack(mask), image, point,
                    lambda t, prompts: self.pipeline.decode_slices(volume_id, target, [t], prompts)[0],
                    sp[1:], reach, self.pipeline.backbone.uses_mask_prompt, stack(removed),
                    self.pipeline.probe_config(None, axis), self.config)
                region = uncontradicted(region, point, True, head, sp[1:], self.config)
                stack(mask)[region] = True
                stack(removed)[region] = False
                defenders = np.vstack([defenders, [point]])
            else:  # it takes back the positive prompts right under it (an earlier click there was wrong)
                defenders = defenders[np.linalg.norm((defenders - point) * sp, axis=1) >= self.config.click_mm]
                region = leak_around(stack(mask), image, point, self._guarded(defenders, session, point, sp), sp,
                                     reach, self.config, hold_core=not self.pipeline.knows(session.label, axis))
                region = uncontradicted(region, point, False, head, sp[1:], self.config)
                stack(mask)[region] = False
                stack(removed)[region] = True
            effects.append(_effect(click, before, stack(mask)))
        seeds = np.array([_to_volume(p, axis) for p in defenders], dtype=int).reshape(-1, 3)
        seeds = seeds[~removed[tuple(seeds.T)]]  # a prompt in a removed leak holds nothing
        if mask.any() and len(seeds):
            # what a cut left without a prompt goes with the leak
            mask = keep_prompted_components(torch.from_numpy(mask), torch.from_numpy(seeds)).numpy()
        changed = np.flatnonzero((stack(mask) != stack(seg.mask)).any(axis=(1, 2)))
        lo, hi = seg.slice_range
        if changed.size:
            lo, hi = min(lo, int(changed[0])), max(hi, int(changed[-1]))
        return replace(session, clicks=session.clicks + tuple(new),
                       segmentation=replace(seg, mask=mask, slice_range=(lo, hi)), removed=removed,
                       defenders=defenders, steps=session.steps + 1, effects=session.effects + effects)

    def _guarded(self, defenders: np.ndarray, session: Session, point, spacing) -> np.ndarray:
        """Defenders without the interpolated prompts near a negative click (the annotator says the structure is
        not there); the annotator's own positive clicks defend unless the click took them back (``click_mm``)."""
        user = {c.ijk for c in session.clicks if c.positive}
        near = np.linalg.norm((defenders - point) * spacing, axis=1) < self.config.guard_mm
        own = np.array([_to_volume(p, session.axis) in user for p in defenders], dtype=bool).reshape(-1)
        return defenders[~near | own]

    @staticmethod
    def _record(session: Session, mode: str, effects: list[ClickEffect]) -> dict:
        return {"mode": mode, "step": session.steps, "clicks": len(session.clicks),
                "corrections": [e.to_json() for e in effects], "slices_changed": None, "voxels_added": 0,
                "voxels_removed": 0}


def _defenders(seg: Segmentation) -> np.ndarray:
    """Positive prompts that hold the structure (slice, row, col): the consensus points of every slice, or for a
    box prompt the deepest point of each slice's mask."""
    if seg.prompts is not None:
        points = [(s, r, c) for s, p in seg.prompts.prompts.items() for r, c in p.positives]
    else:
        slices = np.moveaxis(seg.mask, seg.axis, 0)
        points = [(s, *medial_point(slices[s])) for s in np.flatnonzero(slices.any(axis=(1, 2)))]
    return np.array(points, dtype=float).reshape(-1, 3).round()


def _change(before: np.ndarray, after: np.ndarray, axis: int) -> dict:
    """Slices (first, last along ``axis``) and voxels a correction changed."""
    added, removed = after & ~before, before & ~after
    changed = np.flatnonzero(np.moveaxis(added | removed, axis, 0).any(axis=(1, 2)))
    return {"slices_changed": [int(changed[0]), int(changed[-1])] if changed.size else None,
            "voxels_added": int(added.sum()), "voxels_removed": int(removed.sum())}


def _to_volume(point, axis: int) -> tuple[int, int, int]:
    in_plane = [a for a in range(3) if a != axis]
    ijk = [0, 0, 0]
    ijk[axis], ijk[in_plane[0]], ijk[in_plane[1]] = (int(round(v)) for v in point)
    return tuple(ijk)


def _effect(click: Click, before: np.ndarray, after: np.ndarray) -> ClickEffect:
    """What one click changed in the stack of slices (``before`` -> ``after``, slices along axis 0)."""
    change = _change(before, after, 0)
    effect = ClickEffect(list(click.ijk), click.positive, change["voxels_added"], change["voxels_removed"],
                         None if change["slices_changed"] is None else tuple(change["slices_changed"]))
    if effect.slices is None:
        effect.note = ("already inside the mask" if click.positive else "outside the mask: nothing to remove")
    return effect
