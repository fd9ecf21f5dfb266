"""Intensity windows that map CT (HU) and MR volumes to [0, 1] as SAM backbones expect."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CT_MIN_HU = -900.0  # a volume whose minimum is below this is treated as CT in HU


@dataclass(frozen=True)
class IntensityWindow:
    """A linear window [low, high] mapped to [0, 1] with clipping."""

    low: float
    high: float
    kind: str

    def apply(self, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Map raw values to float32 in [0, 1] where they are: a numpy array on the host, a tensor on its device (no
        float64 copy of either)."""
        scale = float(np.float32(1.0 / max(self.high - self.low, 1e-6)))
        out = as_tensor(values).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        out.sub_(float(np.float32(self.low))).mul_(scale)
        out.clamp_(0.0, 1.0)
        return out.numpy() if isinstance(values, np.ndarray) else out


def as_tensor(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor of ``values``, sharing a numpy array's memory where its byte order is the machine's (else a copy in
    that order: torch reads no other)."""
    if isinstance(values, np.ndarray) and not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    return torch.as_tensor(values)


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
