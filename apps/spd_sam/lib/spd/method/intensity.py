"""Intensity windows that map CT (HU) and MR volumes to [0, 1] as SAM backbones expect."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CT_MIN_HU = -900.0  # a volume whose minimum is below this is treated as CT in HU


@dataclass(frozen=True)
class IntensityWindow:
    """A linear window [low, high] mapped to [0, 1] with clipping."""

    low: float
    high: float
    kind: str

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Map raw values to float32 in [0, 1] (no float64 copy of the input)."""
        scale = np.float32(1.0 / max(self.high - self.low, 1e-6))
        out = (values.astype(np.float32, copy=True) - np.float32(self.low)) * scale
        return np.clip(out, 0.0, 1.0, out=out)


def choose_window(
    volume: np.ndarray,
    modality: str = "auto",
    ct_window: tuple[float, float] = (40.0, 400.0),
    mr_percentiles: tuple[float, float] = (0.5, 99.5),
    sample: int = 2_000_000,
) -> IntensityWindow:
    """Pick the intensity window for a volume.

    Args:
        volume: the image as stored.
        modality: "CT", "MR" or "auto" (CT when the minimum is below -900, as in HU).
        ct_window: (level, width) in HU for CT.
        mr_percentiles: robust percentiles of the non-zero voxels for MR and other images.
        sample: at most this many voxels are used for the percentiles.
    """
    modality = modality.upper()
    if modality == "AUTO":
        modality = "CT" if float(volume.min()) < CT_MIN_HU else "MR"
    if modality == "CT":
        level, width = ct_window
        return IntensityWindow(level - width / 2.0, level + width / 2.0, "CT")
    flat = volume.ravel()
    step = max(1, flat.size // sample)
    values = flat[::step]
    values = values[values != 0] if np.any(values != 0) else values
    low, high = np.percentile(values.astype(np.float32), mr_percentiles)
    if high <= low:
        high = low + 1.0
    return IntensityWindow(float(low), float(high), modality)
