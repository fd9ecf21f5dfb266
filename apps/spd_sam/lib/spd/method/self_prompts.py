"""Self-prompting: a trained saliency head places the clicks itself, so a learned structure needs none.

Once a label has a trained saliency head (ESP-MedSAM's self-prompting idea), its map over every
slice of the axis it was trained on says where the structure is. The confident voxels are grouped
into 3D components; the one with the most saliency is the structure (each label names one
structure), and a component smaller than ``min_volume_mm3``, or than ``min_fraction`` of the volume the
structure has in the saved labels (its size prior), means it is absent. One click every
few slices at the component's deepest pixel then goes through the same pipeline as an
annotator's clicks: CPD validates them across slices, box probing measures the structure and the
decoder segments it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .prompts import Click, medial_point


@dataclass(frozen=True)
class SelfPromptConfig:
    """How confident regions become clicks.

    Args:
        threshold: saliency at or above which a voxel is confident.
        min_volume_mm3: a confident component smaller than this is noise, not the structure.
        min_fraction: nor is one smaller than this fraction of the structure's volume in the saved labels.
        every: one click every ``every`` slices of the component, as an annotator clicks.
    """

    threshold: float = 0.5
    min_volume_mm3: float = 100.0
    min_fraction: float = 0.25
    every: int = 3


@dataclass(frozen=True)
class SelfPrompts:
    """The clicks placed for one structure and how sure the head is of it."""

    clicks: list[Click]
    confidence: float  # mean saliency over the chosen component
    volume_mm3: float  # of the chosen component


def self_prompts(saliency: np.ndarray, axis: int, spacing: Sequence[float],
                 config: SelfPromptConfig = SelfPromptConfig(), expected_mm3: float | None = None) -> SelfPrompts | None:
    """Clicks (IJK) on the structure a saliency volume shows, or None when it shows none.

    Args:
        saliency: (N, H, W) maps in [0, 1] of every slice along ``axis`` (slice n is index n); rows and
            columns are the remaining axes in order.
        axis: the slice axis of the maps.
        spacing: voxel size in mm per axis of the volume.
        config: threshold, minimum volume and click spacing.
        expected_mm3: the structure's volume in the saved labels (None: unknown).
    """
    components, count = ndimage.label(saliency >= config.threshold)
    if count == 0:
        return None
    mass = ndimage.sum_labels(saliency, components, index=np.arange(1, count + 1))
    structure = components == int(np.argmax(mass)) + 1
    volume_mm3 = float(structure.sum() * np.prod(spacing))
    if volume_mm3 < max(config.min_volume_mm3, config.min_fraction * (expected_mm3 or 0.0)):
        return None
    in_plane = [a for a in range(3) if a != axis]
    slices = np.flatnonzero(structure.any(axis=(1, 2)))
    chosen = slices[(len(slices) - 1) // 2 % config.every::config.every]  # the middle slice is always one
    clicks = []
    for s in chosen:
        row, col = medial_point(structure[s])
        ijk = [0, 0, 0]
        ijk[axis], ijk[in_plane[0]], ijk[in_plane[1]] = int(s), row, col
        clicks.append(Click(tuple(ijk), True))
    return SelfPrompts(clicks, float(saliency[structure].mean()), volume_mm3)
