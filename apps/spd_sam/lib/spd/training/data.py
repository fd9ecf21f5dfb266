"""Training data for SPD: labelled volumes, their embedded slabs, volume-level splits and simulated clicks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from ..method.box_probing import Box, ProbeConfig, padded_box, probe_boxes
from ..method.intensity import IntensityWindow
from ..method.pipeline import SPDPipeline, VolumeView
from ..method.prompts import Click, training_axis
from .click_simulation import ClickStyle, simulate_clicks


@dataclass
class LabelledVolume:
    """An image with its final label map, as the infer side sees it (same id and window: same cache keys).

    Attributes:
        name: image id.
        volume: (I, J, K) image as stored.
        labels: (I, J, K) label values.
        spacing: voxel size in mm.
        volume_id: the id ``VolumeReader`` gives the image (embedding cache key).
        window: the intensity window inference uses.
    """

    name: str
    volume: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    volume_id: str
    window: IntensityWindow

    def present(self, label_values: Mapping[str, int]) -> list[str]:
        """Names of the labels that occur in this volume."""
        values = set(np.unique(self.labels).tolist())
        return [name for name, value in label_values.items() if value in values]


@dataclass
class Slab:
    """The embedded slices of a volume along the training axis: every slice of a label plus a margin."""

    volume: LabelledVolume
    view: VolumeView
    indices: list[int]
    embeddings: torch.Tensor  # (N, C, g, g), float16

    def masks(self, value: int) -> np.ndarray:
        """(N, H, W) bool masks of one label on the slab's slices."""
        return np.moveaxis(np.take(self.volume.labels == value, self.indices, axis=self.view.axis), self.view.axis, 0)


def round_axis(volumes: Sequence[LabelledVolume]) -> int:
    """The slice axis of a round: the :func:`training_axis` of most volumes (each from its own spacing and
    shape; ties: the first volume's)."""
    axes = [training_axis(v.spacing, v.labels.shape) for v in volumes]
    return max(dict.fromkeys(axes), key=axes.count)


def slab_indices(labels: np.ndarray, values: Sequence[int], axis: int, margin: int) -> list[int]:
    """Slices holding any of ``values``, from the first to the last, plus ``margin`` slices each side."""
    in_plane = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(np.isin(labels, list(values)).any(axis=in_plane))
    if present.size == 0:
        return []
    return list(range(max(int(present[0]) - margin, 0), min(int(present[-1]) + margin, labels.shape[axis] - 1) + 1))


def embed_slab(pipeline: SPDPipeline, volume: LabelledVolume, values: Sequence[int], axis: int, margin: int) -> Slab:
    """Embed (through the pipeline's cache) the slices that training on ``values`` needs."""
    view = VolumeView(volume.volume, axis, volume.window)
    indices = slab_indices(volume.labels, values, axis, margin)
    return Slab(volume, view, indices, pipeline.embed(volume.volume_id, view, indices))


def split_by_volume(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle volume names with ``seed`` and hold out ``val_fraction`` of them (at least one when 2+ volumes)."""
    order = sorted(names)
    np.random.default_rng(seed).shuffle(order)
    if len(order) < 2 or val_fraction <= 0:
        return order, []
    held = min(max(1, round(val_fraction * len(order))), len(order) - 1)
    return order[held:], order[:held]


def nearest_other_label(labels: np.ndarray, value: int) -> np.ndarray | None:
    """Mask of the labelled structure whose centre is nearest to ``value``'s (where off-target clicks land)."""
    others = [v for v in np.unique(labels).tolist() if v not in (0, value)]
    if not others:
        return None
    centres = ndimage.center_of_mass(np.ones_like(labels), labels, [value, *others])
    distance = [float(np.linalg.norm(np.subtract(c, centres[0]))) for c in centres[1:]]
    return labels == others[int(np.argmin(distance))]


def clicks_for(volume: LabelledVolume, value: int, axis: int, style: ClickStyle, rng: np.random.Generator) -> list[Click]:
    """Simulated clinical clicks on one structure; off-target ones land on its nearest labelled neighbour."""
    target = volume.labels == value
    ijk, _ = simulate_clicks(target, volume.spacing, axis, style, rng, nearest_other_label(volume.labels, value))
    return [Click(tuple(int(v) for v in c), True) for c in ijk]


def ideal_anchor_boxes(target: np.ndarray, axis: int, anchors: Mapping[int, Sequence[float]], pixel_mm: Sequence[float],
                       probes: ProbeConfig, rng: np.random.Generator, jitter_mm: float = 1.0) -> dict[int, Box]:
    """The boxes box probing would measure on the anchored slices with a perfect decoder.

    The structure's bounding box on the slice, padded as box probing pads (each side jittered by
    ``jitter_mm``), when the consensus point lies within the largest probe of it; otherwise the
    smallest probe around the point, as box probing falls back to when its masks are empty.

    Args:
        target: (I, J, K) bool mask of the structure.
        axis: slice axis.
        anchors: slice index -> consensus point (row, col).
        pixel_mm: in-plane spacing (row, col).
        probes: the pipeline's probe sizes and padding.
        rng: random generator for the jitter.
    """
    pixel_mm = np.asarray(pixel_mm, dtype=float)
    boxes = {}
    for s, point in anchors.items():
        plane = np.take(target, s, axis=axis)
        rows, cols = np.nonzero(plane)
        near = rows.size and np.min(np.hypot((rows - point[0]) * pixel_mm[0], (cols - point[1]) * pixel_mm[1])) <= max(
            probes.half_sizes_mm)
        if not near:
            boxes[s] = probe_boxes(point, pixel_mm, plane.shape, probes)[0]
            continue
        pad = (probes.pad_mm + rng.normal(0.0, jitter_mm, 4)) / np.tile(pixel_mm, 2)
        boxes[s] = padded_box(plane, pad)
    return boxes
