"""A **synthetic** CT phantom of touching, crossing tubes (bowel loops traced by centre-line clicks).

Tubes of soft-tissue density wind through abdominal fat inside a body outline; neighbours touch the
target on some slices and one loop crosses it in-plane, with the same intensity, so only the line the
clicks draw across slices tells them apart. Intensities are Hounsfield units with noise and a smooth
texture; voxels 0.8 x 0.8 x 2.5 mm, as an abdominal CT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Phantom:
    """Image (HU, int16), label map (one value per tube), spacing in mm and the tube names by value."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    names: dict[int, str]


def _tube(shape, spacing, centre_of_z, radius_mm) -> np.ndarray:
    """Bool mask of a tube whose in-plane centre (mm) at slice k is ``centre_of_z(k)`` (None: absent)."""
    ii, jj = np.indices(shape[:2])
    mask = np.zeros(shape, dtype=bool)
    for k in range(shape[2]):
        centre = centre_of_z(k)
        if centre is not None:
            mask[:, :, k] = np.hypot(ii * spacing[0] - centre[0], jj * spacing[1] - centre[1]) <= radius_mm
    return mask


def make_tube_phantom(seed: int = 0, shape=(160, 160, 48), spacing=(0.8, 0.8, 2.5)) -> Phantom:
    """One phantom; ``seed`` varies the paths, radii, intensities and noise."""
    rng = np.random.default_rng(seed)
    depth_mm = shape[2] * spacing[2]
    mid = np.array(shape[:2]) * spacing[:2] / 2
    tubes, names = [], {}

    def winding(x0, y0, amplitude, period, phase, radius):
        def centre(k):
            z = k * spacing[2]
            return (x0 + amplitude * np.sin(2 * np.pi * z / period + phase),
                    y0 + amplitude * np.cos(2 * np.pi * z / period + 1.3 * phase))
        return centre, radius

    r = rng.uniform(6.0, 8.0, 4)
    gap = r[0] + r[1] + rng.uniform(-1.0, 0.5)  # target and first neighbour touch or nearly so
    tubes.append(winding(mid[0] - 8, mid[1] - 6, rng.uniform(5, 8), depth_mm * rng.uniform(0.8, 1.2),
                         rng.uniform(0, 2 * np.pi), r[0]))
    tubes.append(winding(mid[0] - 8 + gap, mid[1] - 6, rng.uniform(4, 7), depth_mm * rng.uniform(0.8, 1.2),
                         rng.uniform(0, 2 * np.pi), r[1]))
    tubes.append(winding(mid[0] - 8, mid[1] - 6 + r[0] + r[2] + rng.uniform(0, 3), rng.uniform(4, 7),
                         depth_mm * rng.uniform(0.9, 1.4), rng.uniform(0, 2 * np.pi), r[2]))

    crossing_z = rng.uniform(0.35, 0.65) * depth_mm
    def crossing(k):  # a loop lying in a few slices, sweeping across the target's neighbourhood
        z = k * spacing[2]
        if abs(z - crossing_z) > 6.0:
            return None
        return mid[0] - 8 - r[0] - r[3] + 1.0, mid[1] - 6 + 3.0 * (z - crossing_z)
    tubes.append((crossing, r[3]))

    labels = np.zeros(shape, dtype=np.uint8)
    for value, (centre, radius) in enumerate(tubes, start=1):
        mask = _tube(shape, spacing, centre, radius) & (labels == 0)
        labels[mask] = value
        names[value] = f"loop_{value}"

    ii, jj = np.indices(shape[:2])
    body = ((ii * spacing[0] - mid[0]) / (mid[0] * 0.95)) ** 2 + ((jj * spacing[1] - mid[1]) / (mid[1] * 0.8)) ** 2 <= 1
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[body] = -95.0  # abdominal fat
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), sigma=(3, 3, 1))
    texture /= max(float(texture.std()), 1e-6)
    tissue = rng.uniform(30.0, 50.0)
    image[labels > 0] = tissue + 8.0 * texture[labels > 0]
    image += rng.normal(0.0, rng.uniform(10.0, 20.0), shape)
    image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.0))  # partial volume at the walls
    return Phantom(np.round(image).astype(np.int16), labels, tuple(float(s) for s in spacing), names)
