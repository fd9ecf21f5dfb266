"""Build a MONAI Label sample datastore from real volumes that ship offline.

Studies: Colin27 T1 with AAL deep grey matter labels, INIA19 macaque T1,
MNI152 T1 (bundled in nilearn) and the InVesalius "Cranium" head CT.

Usage: python scripts/make_sample_studies.py --out sample_studies
"""

from __future__ import annotations

import argparse
import json
import os
import plistlib
import tarfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn.datasets import load_mni152_template
from nilearn.image import resample_to_img

TEMPLATES = Path("/usr/share/mricron/templates")
CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
LABELS_JSON = Path(__file__).resolve().parents[1] / "apps" / "spd_sam" / "labels.json"
SOURCES = {
    TEMPLATES / "ch2.nii.gz": "mricron-data",
    TEMPLATES / "aal.nii.gz": "mricron-data",
    TEMPLATES / "aal.nii.txt": "mricron-data",
    TEMPLATES / "inia19-t1-brain.nii.gz": "mricron-data",
    CRANIUM: "invesalius-examples",
}
AAL_SIDES = {"L": "left", "R": "right"}
INVESALIUS_AXIAL = 1  # InVesalius constants.AXIAL

Study = tuple[str, nib.Nifti1Image, nib.Nifti1Image | None]


def check_sources() -> None:
    """Exit with an install hint if a Debian-packaged source file is missing."""
    missing = [f"{p} (apt-get install {pkg})" for p, pkg in SOURCES.items() if not p.is_file()]
    if missing:
        raise SystemExit("error: missing source data:\n  " + "\n  ".join(missing))


def nifti(data: np.ndarray, affine: np.ndarray, code: int) -> nib.Nifti1Image:
    """Wrap an array with identical qform and sform so every reader agrees on geometry."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    return img


def aal_to_app(txt: Path, labels: dict[str, int]) -> dict[int, int]:
    """Map AAL voxel values to app label indices, e.g. Caudate_R (72) -> right_caudate.

    Args:
        txt: AAL name list, lines of "<value> <Name_L|Name_R> <code>" (CRLF endings).
        labels: App label map, name -> index.

    Returns:
        AAL value -> app label index, covering every app label.
    """
    mapping = {}
    for line in txt.read_text().splitlines():
        if not line.strip():
            continue
        value, name = line.split()[:2]
        structure, _, side = name.rpartition("_")
        app_name = f"{AAL_SIDES.get(side, '')}_{structure.lower()}"
        if app_name in labels:
            mapping[int(value)] = labels[app_name]
    missing = set(labels.values()) - set(mapping.values())
    if missing:
        raise ValueError(f"labels {sorted(missing)} of {LABELS_JSON} not found in {txt}")
    return mapping


def colin27(labels: dict[str, int]) -> Study:
    """Colin27 T1 (ch2) and its AAL deep grey matter label on the same grid."""
    t1 = nib.load(TEMPLATES / "ch2.nii.gz")
    aal = nib.load(TEMPLATES / "aal.nii.gz")
    # ch2's qform is bogus (y/z flipped) but has qform_code 0; its sform (MNI) is
    # the real geometry, and nibabel's .affine returns it.
    if aal.shape != t1.shape or not np.allclose(aal.affine, t1.affine):
        # The mricron AAL ships on ch2's grid; resample in case a repackaging breaks that.
        aal = resample_to_img(aal, t1, interpolation="nearest")
    lut = np.zeros(256, dtype=np.uint8)
    for value, index in aal_to_app(TEMPLATES / "aal.nii.txt", labels).items():
        lut[value] = index
    code = int(t1.header["sform_code"])
    image = np.asanyarray(t1.dataobj).astype(np.int16)  # uint8 0..254, no scaling: lossless
    label = lut[np.asanyarray(aal.dataobj).astype(np.uint8)]
    return "colin27_t1", nifti(image, t1.affine, code), nifti(label, t1.affine, code)


def inia19() -> Study:
    """INIA19 macaque T1 template (skull-stripped, 0.5 mm, float32)."""
    t1 = nib.load(TEMPLATES / "inia19-t1-brain.nii.gz")
    image = t1.get_fdata(dtype=np.float32)
    return "inia19_macaque_t1", nifti(image, t1.affine, int(t1.header["sform_code"])), None


def mni152() -> Study:
    """MNI152 T1 1 mm template bundled in nilearn (no download)."""
    t1 = load_mni152_template(resolution=1)
    # nilearn rescales to 0..1 float32 but keeps the uint8 header dtype, so
    # saving the image as is would round everything to 0 or 1; rebuild it.
    image = t1.get_fdata(dtype=np.float32)
    return "mni152_t1", nifti(image, t1.affine, int(t1.header["sform_code"])), None


def invesalius_ct(path: Path) -> Study:
    """Head CT from an InVesalius 3 project (.inv3, a tar.gz of plists and a raw matrix).

    main.plist gives the matrix file, dtype, shape (slice, row, column) and the
    spacing in VTK order (column, row, slice). Axis mapping, checked on the
    anatomy (nose at high rows, vertex in the last slices) and assuming the
    usual DICOM axial column direction (patient right -> left):
      matrix axis 0 (slice)  inferior -> superior  => k (+S)
      matrix axis 1 (row)    posterior -> anterior => j (+A), InVesalius flips DICOM rows
      matrix axis 2 (column) right -> left         => i reversed (+R)
    so the NIfTI is RAS+ with a diagonal affine centred on the volume.
    """
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers()}
        meta = plistlib.load(tar.extractfile(members["main.plist"]))
        matrix = meta["matrix"]
        raw = tar.extractfile(members[matrix["filename"]]).read()
    if meta["modality"] != "CT" or meta["orientation"] != INVESALIUS_AXIAL:
        raise ValueError(f"{path}: not an axial CT ({meta['modality']}, {meta['orientation']})")
    # Written as a little-endian numpy memmap; the HU range check guards the byte order.
    dtype = np.dtype(matrix["dtype"]).newbyteorder("<")
    volume = np.frombuffer(raw, dtype=dtype).reshape(matrix["shape"])
    low, high = meta["scalar_range"]
    if volume.min() < low or volume.max() > high:
        raise ValueError(f"{path}: values outside scalar_range {low}..{high}")
    image = volume.transpose(2, 1, 0)[::-1].astype(np.int16)
    spacing = np.asarray(meta["spacing"], dtype=float)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(image.shape) - 1) / 2
    return "invesalius_head_ct", nifti(image, affine, code=1), None


def write_atomic(img: nib.Nifti1Image, path: Path) -> None:
    """Save via a hidden temp file in the same folder (skipped by datastore globs), then rename."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def studies(labels: dict[str, int]) -> Iterator[Study]:
    """Yield (name, image, label or None) for every sample study."""
    yield colin27(labels)
    yield inia19()
    yield mni152()
    yield invesalius_ct(CRANIUM)


def main(argv: list[str] | None = None) -> None:
    """Write all studies into a MONAI Label local datastore folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="datastore folder to (re)write")
    out = parser.parse_args(argv).out
    check_sources()
    labels = json.loads(LABELS_JSON.read_text())
    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for name, image, label in studies(labels):
        present = "none"
        if label is not None:  # label first: the study appears only once it is complete
            write_atomic(label, out / "labels" / "final" / f"{name}.nii.gz")
            present = str(np.unique(np.asanyarray(label.dataobj))[1:].tolist())
        write_atomic(image, out / f"{name}.nii.gz")
        spacing = tuple(round(float(s), 4) for s in image.header.get_zooms())
        dtype = image.get_data_dtype()
        print(f"{name}: shape={image.shape} spacing={spacing} dtype={dtype} labels={present}")


if __name__ == "__main__":
    main()
