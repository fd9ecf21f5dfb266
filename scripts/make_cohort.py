"""Make a small **synthetic** cohort from Colin27 + AAL for training tests and benchmarks.

Every subject is the one real Colin27 T1 MRI (and its AAL deep grey labels) resampled through a
random smooth elastic deformation and a small rotation/scaling, then given a multiplicative bias
field, a contrast (gamma) change and Rician noise. The subjects are therefore *not* different
people: they are plausible variations of one brain, good for checking that training learns, not
for claims about real patient populations.

Optionally the volumes are cropped around the chosen structures and resampled to thicker slices
(fewer slices to embed on a 2-core CPU).

    .venv/bin/python scripts/make_cohort.py --out /tmp/cohort --count 4 --labels right_caudate,right_putamen \\
        --crop-margin-mm 35,35,8 --slice-mm 2.5
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "sample_studies"
SOURCE_IMAGE = STUDIES / "colin27_t1.nii.gz"
SOURCE_LABEL = STUDIES / "labels" / "final" / "colin27_t1.nii.gz"
LABELS_JSON = ROOT / "apps" / "spd_sam" / "labels.json"


@dataclass(frozen=True)
class CohortStyle:
    """How far subjects vary from the source.

    Args:
        elastic_mm: RMS of the smooth elastic displacement.
        elastic_spacing_mm: spacing of its random control points (larger: smoother).
        rotate_deg: maximum in-plane rotation (about the last axis).
        scale: maximum relative global scaling.
        bias: maximum amplitude of the log bias field (0.2: about +-20 % intensity).
        gamma: range of the contrast exponent applied to normalised intensities.
        noise: Rician noise sigma as a fraction of the 99th intensity percentile.
    """

    elastic_mm: float = 2.5
    elastic_spacing_mm: float = 24.0
    rotate_deg: float = 5.0
    scale: float = 0.05
    bias: float = 0.2
    gamma: tuple[float, float] = (0.75, 1.35)
    noise: float = 0.03


@dataclass
class Subject:
    """One synthetic volume: image, label map (app label values) and affine."""

    name: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def _smooth_field(shape: Sequence[int], step_vox: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS random field varying over about ``step_vox`` voxels (cubic upsampling of coarse noise)."""
    coarse_shape = [max(2, int(np.ceil(n / s)) + 2) for n, s in zip(shape, step_vox)]
    coarse = rng.standard_normal(coarse_shape)
    field = ndimage.zoom(coarse, [n / c for n, c in zip(shape, coarse_shape)], order=3, mode="nearest")
    field = field[tuple(slice(0, n) for n in shape)]
    return field / max(float(field.std()), 1e-6)


def _output_grid(source_shape, source_spacing, label, keep, margin_mm, slice_mm):
    """Start voxel, step (source voxels per output voxel) and shape of the output grid."""
    spacing = np.asarray(source_spacing, dtype=float)
    if margin_mm is None:
        start, stop = np.zeros(3), np.asarray(source_shape, dtype=float) - 1
    else:
        found = np.argwhere(np.isin(label, keep))
        assert found.size, f"none of the labels {keep} is present in the source"
        margin = np.broadcast_to(np.asarray(margin_mm, dtype=float), 3) / spacing
        start = np.maximum(found.min(0) - margin, 0)
        stop = np.minimum(found.max(0) + margin, np.asarray(source_shape) - 1)
    step = np.ones(3)
    if slice_mm is not None:
        step[2] = slice_mm / spacing[2]
    shape = (np.floor((stop - start) / step) + 1).astype(int)
    return start, step, tuple(int(n) for n in shape)


def make_subject(image: np.ndarray, label: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
                 style: CohortStyle = CohortStyle(), keep: Sequence[int] | None = None,
                 crop_margin_mm: float | Sequence[float] | None = None, slice_mm: float | None = None,
                 name: str = "synth") -> Subject:
    """One synthetic subject: deformed, cropped/resampled, bias field, contrast change and noise.

    Args:
        image: source (I, J, K) intensities.
        label: source (I, J, K) label values.
        affine: source voxel-to-world affine.
        rng: random generator.
        style: variation ranges.
        keep: label values to keep (default all non-zero); the others become 0.
        crop_margin_mm: crop to the kept labels plus this margin, one value or one per axis (None: whole volume).
        slice_mm: resample the last axis to this spacing (None: as the source).
        name: subject name.
    """
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    keep = [int(v) for v in (keep if keep is not None else np.unique(label)[1:])]
    start, step, shape = _output_grid(image.shape, spacing, label, keep, crop_margin_mm, slice_mm)
    grid = np.stack(np.meshgrid(*[start[a] + step[a] * np.arange(shape[a]) for a in range(3)], indexing="ij"))

    centre = (start + step * (np.asarray(shape) - 1) / 2)[:, None, None, None]
    angle = np.deg2rad(rng.uniform(-style.rotate_deg, style.rotate_deg))
    zoom = 1.0 + rng.uniform(-style.scale, style.scale)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    offset_mm = (grid - centre) * spacing[:, None, None, None]
    moved_mm = np.einsum("ab,b...->a...", rotation, offset_mm) / zoom
    control = style.elastic_spacing_mm / (spacing * step)
    for a in range(3):
        moved_mm[a] += style.elastic_mm / np.sqrt(3.0) * _smooth_field(shape, control, rng)
    coords = centre + moved_mm / spacing[:, None, None, None]

    warped = ndimage.map_coordinates(image.astype(np.float32), coords, order=1, mode="nearest")
    labels = ndimage.map_coordinates(label, coords, order=0, mode="constant", cval=0)
    labels = np.where(np.isin(labels, keep), labels, 0).astype(np.uint8)

    scale = float(np.percentile(warped, 99)) or 1.0
    bias = np.exp(style.bias * np.tanh(_smooth_field(shape, 80.0 / (spacing * step), rng)))
    gamma = rng.uniform(*style.gamma)
    contrasted = scale * np.clip(warped / scale, 0, None) ** gamma * bias
    sigma = style.noise * scale
    noisy = np.hypot(contrasted + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))

    out_affine = affine.copy()
    out_affine[:3, :3] = affine[:3, :3] * step[None, :]
    out_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return Subject(name, np.round(noisy).astype(np.int16), labels, out_affine)


def make_cohort(count: int, seed: int = 0, labels: Sequence[str] | None = None,
                crop_margin_mm: float | Sequence[float] | None = None,
                slice_mm: float | None = None, style: CohortStyle = CohortStyle(), prefix: str = "synth",
                source_image: Path = SOURCE_IMAGE, source_label: Path = SOURCE_LABEL) -> list[Subject]:
    """``count`` synthetic subjects made from Colin27 + AAL (see the module docstring).

    Args:
        count: number of subjects.
        seed: seed of the whole cohort (subject n uses ``seed * 1000 + n``).
        labels: structure names from ``labels.json`` to keep (default all).
        crop_margin_mm: crop around the kept structures with this margin, one value or one per axis
            (None: whole volume).
        slice_mm: spacing of the last axis after resampling (None: 1 mm as the source).
        style: variation ranges.
        prefix: subject names are ``{prefix}_{n:03d}``.
    """
    names = json.loads(LABELS_JSON.read_text())
    keep = None if labels is None else [names[n] for n in labels]
    source = nib.load(source_image)
    image = np.asarray(source.dataobj, dtype=np.float32)
    label = np.asarray(nib.load(source_label).dataobj).astype(np.uint8)
    return [make_subject(image, label, source.affine, np.random.default_rng(seed * 1000 + n), style, keep,
                         crop_margin_mm, slice_mm, f"{prefix}_{n:03d}") for n in range(count)]


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI through a hidden temp file, so a datastore never lists a half-written volume."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = path.with_name(f".tmp-{path.name}")
    nib.save(img, tmp)
    os.replace(tmp, path)


def write_cohort(subjects: Sequence[Subject], image_dir: Path, label_dir: Path | None) -> None:
    """Write images as ``<name>.nii.gz`` into ``image_dir`` and labels into ``label_dir`` (if given)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    for subject in subjects:
        if label_dir is not None:
            label_dir.mkdir(parents=True, exist_ok=True)
            _save(subject.label, subject.affine, label_dir / f"{subject.name}.nii.gz")
        _save(subject.image, subject.affine, image_dir / f"{subject.name}.nii.gz")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Synthetic cohort from Colin27 + AAL (deformed, biased, noisy).")
    parser.add_argument("--out", type=Path, required=True, help="folder for the images (a MONAI Label studies folder)")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", default="", help="comma-separated structure names to keep (default all)")
    parser.add_argument("--crop-margin-mm", default=None, help="one margin, or three (per axis) separated by commas")
    parser.add_argument("--slice-mm", type=float, default=None)
    parser.add_argument("--label-dir", type=Path, default=None, help="where labels go (default <out>/labels/final)")
    parser.add_argument("--no-labels", action="store_true", help="write images only")
    args = parser.parse_args(argv)
    labels = [n for n in args.labels.split(",") if n] or None
    margin = None if args.crop_margin_mm is None else [float(v) for v in args.crop_margin_mm.split(",")]
    subjects = make_cohort(args.count, args.seed, labels, margin, args.slice_mm)
    label_dir = None if args.no_labels else (args.label_dir or args.out / "labels" / "final")
    write_cohort(subjects, args.out, label_dir)
    for s in subjects:
        zooms = np.sqrt((s.affine[:3, :3] ** 2).sum(axis=0)).round(2).tolist()
        print(f"{s.name}: shape={s.image.shape} spacing={zooms} labels={np.unique(s.label)[1:].tolist()} (synthetic)")


if __name__ == "__main__":
    main()
