"""What saved labels say about a structure's in-plane size: the probe sizes box probing tries.

Box probing grows square probes around a validated click until the decoder's mask stops
changing. Its default ladder (5 to 18 mm half-size) fits no structure in particular: small ones
are probed with boxes that take in their neighbours, large ones are cut, and long thin ones (a
putamen on an axial slice) are probed with squares that hold their neighbours across. Once labels
of a structure are saved, the sizes and the in-plane shape it has on its slices are known, and the
probes follow them instead: boxes of its shape, from a little under its median size to a little
over its large end, so the stable probe holds the whole structure and not much around it. Learned
at run time from the datastore's labels, never shipped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

from .box_probing import ProbeConfig

QUANTILES = (0.25, 0.5, 0.75, 0.95)  # of per-slice half-sizes: the probe ladder
MARGIN_MM = 1.0  # room between the structure and the probe's edge


@dataclass(frozen=True)
class SizePrior:
    """A structure's sizes on its slices along ``axis``: half the larger side of its bounding box in mm (at
    :data:`QUANTILES`) and the median ratio of its (rows, columns) sides (the larger is 1); and its median volume
    over the labelled volumes (None in priors published before it was learned)."""

    axis: int
    half_mm: tuple[float, ...]
    aspect: tuple[float, float]
    slices: int  # labelled slices it was learned from
    volume_mm3: float | None = None

    def probes(self, base: ProbeConfig) -> ProbeConfig:
        """``base`` with the ladder of half-sizes (growing, distinct, at least 2 mm) and the shape of this structure."""
        ladder = sorted({round(max(h + MARGIN_MM, 2.0), 1) for h in self.half_mm})
        return replace(base, half_sizes_mm=tuple(ladder), aspect=self.aspect)

    def to_json(self) -> dict:
        return {"axis": self.axis, "half_mm": list(self.half_mm), "aspect": list(self.aspect), "slices": self.slices,
                "volume_mm3": self.volume_mm3}

    @classmethod
    def from_json(cls, data: dict) -> "SizePrior":
        half, aspect = tuple(float(h) for h in data["half_mm"]), tuple(float(a) for a in data["aspect"])
        if len(half) != len(QUANTILES) or not all(h > 0 for h in half):
            raise ValueError(f"size prior: {len(QUANTILES)} positive half-sizes expected, got {data['half_mm']}")
        if len(aspect) != 2 or not all(0 < a <= 1 for a in aspect):
            raise ValueError(f"size prior: aspect must be two ratios in (0, 1], got {data['aspect']}")
        volume = data.get("volume_mm3")
        if volume is not None and not float(volume) > 0:
            raise ValueError(f"size prior: volume_mm3 must be positive, got {volume}")
        return cls(int(data["axis"]), half, aspect, int(data["slices"]), None if volume is None else float(volume))


def slice_extents_mm(mask: np.ndarray, axis: int, spacing: Sequence[float]) -> np.ndarray:
    """(N, 2) sides (rows, columns) in mm of the mask's bounding box on each slice along ``axis`` that holds it."""
    in_plane = [a for a in range(3) if a != axis]
    pixel = np.array([spacing[a] for a in in_plane], dtype=float)
    moved = np.moveaxis(mask, axis, 0)
    rows, cols = moved.any(axis=2), moved.any(axis=1)  # (slices, H), (slices, W)
    present = rows.any(axis=1)
    out = []
    for r, c in zip(rows[present], cols[present]):
        r_idx, c_idx = np.flatnonzero(r), np.flatnonzero(c)
        out.append(np.array([r_idx[-1] - r_idx[0] + 1, c_idx[-1] - c_idx[0] + 1]) * pixel)
    return np.array(out).reshape(-1, 2)


def learn_size_prior(masks: Iterable[tuple[np.ndarray, Sequence[float]]], axis: int) -> SizePrior | None:
    """The prior of one structure from its masks (with their voxel spacings); None when no slice holds it."""
    masks = list(masks)
    sides = np.concatenate([slice_extents_mm(m, axis, spacing) for m, spacing in masks] or [np.zeros((0, 2))])
    if not len(sides):
        return None
    volumes = [float(m.sum() * np.prod(spacing)) for m, spacing in masks if m.any()]
    half = np.quantile(sides.max(axis=1) / 2, QUANTILES)
    shape = np.median(sides, axis=0)
    return SizePrior(axis, tuple(round(float(q), 2) for q in half), tuple(round(float(a), 3) for a in shape / shape.max()),
                     len(sides), round(float(np.median(volumes)), 1))
