"""Write a NIfTI volume as a DICOM CT or MR series whose voxel indices are the NIfTI's.

One file per k slice, Columns along the NIfTI i axis and Rows along j. Readers that order slices
along their normal (ITK, 3D Slicer, MONAI Label's DICOMweb datastore) then see voxel (i, j, k) where
the NIfTI has it, so clicks given as voxel indices mean the same voxel in both. UIDs derive from the
volume's name: converting the same file twice gives the same study, series and instances.

Usage: python scripts/nifti_to_dicom.py sample_studies/colin27_t1.nii.gz /tmp/colin27_t1 [--modality MR] [--verify]
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage,
                         generate_uid)
from pydicom.valuerep import DSfloat

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
CT_BELOW_HU = -900.0  # the app's rule too: a volume whose minimum is below this is CT
UINT16_MAX = 65535
TOLERANCE_MM = 1e-4


@dataclass(frozen=True)
class Geometry:
    """Slice geometry in DICOM patient coordinates (LPS, mm)."""

    row: np.ndarray  # unit vector along a row (increasing column index = NIfTI i)
    column: np.ndarray  # unit vector along a column (increasing row index = NIfTI j)
    spacing: tuple[float, float, float]  # mm along i, j, k
    positions: np.ndarray  # (depth, 3) position of voxel (0, 0, k) for each slice


@dataclass(frozen=True)
class DicomSeries:
    """A written series and its identifiers."""

    name: str
    modality: str
    study_uid: str
    series_uid: str
    files: list[Path]


def volume_name(path: Path) -> str:
    """``colin27_t1.nii.gz`` -> ``colin27_t1``."""
    return path.name.removesuffix(".gz").removesuffix(".nii")


def uid(name: str, role: str) -> str:
    """A UID that depends only on the volume's name and the role (study, series, instance ...)."""
    return generate_uid(entropy_srcs=[name, role])


def geometry(affine: np.ndarray, depth: int) -> Geometry:
    """Slice geometry of a NIfTI (RAS) affine.

    Raises:
        ValueError: the affine is sheared or left-handed; no DICOM series read by ITK keeps its indices.
    """
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=float)
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    row, column, normal = (axes / spacing).T
    if abs(row @ column) > TOLERANCE_MM or np.linalg.norm(np.cross(row, column) - normal) > TOLERANCE_MM:
        if np.linalg.norm(np.cross(row, column) + normal) <= TOLERANCE_MM:
            raise ValueError("left-handed affine: ITK would reverse the slice order; flip one axis first")
        raise ValueError("sheared affine: the k axis is not normal to the slices")
    positions = lps[:3, 3] + np.arange(depth)[:, None] * axes[:, 2]
    return Geometry(row, column, tuple(float(s) for s in spacing), positions)


def guess_modality(data: np.ndarray) -> str:
    """CT when values reach air in Hounsfield units, else MR."""
    return "CT" if float(data.min()) < CT_BELOW_HU else "MR"


def encode(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Unsigned 16-bit stored values with value = stored * slope + intercept.

    Integer volumes keep their exact values (slope 1, intercept the minimum if negative);
    others are quantised to 65536 levels.
    """
    low, high = float(data.min()), float(data.max())
    if np.array_equal(data, np.round(data)) and high - min(low, 0.0) <= UINT16_MAX:
        slope, intercept = 1.0, min(low, 0.0)
    else:
        slope, intercept = ((high - low) / UINT16_MAX or 1.0), low
    stored = np.round((data.astype(np.float64) - intercept) / slope)
    return stored.astype("<u2"), slope, intercept


def ds(*values: float) -> list[DSfloat]:
    """Decimal strings that fit DICOM's 16 characters."""
    return [DSfloat(float(v), auto_format=True) for v in values]


def series_dataset(name: str, modality: str, shape: tuple[int, int, int], geo: Geometry,
                   slope: float, intercept: float) -> Dataset:
    """Attributes shared by every slice of the series (patient, study, series, frame of reference, image)."""
    d = Dataset()
    d.PatientName, d.PatientID, d.PatientBirthDate, d.PatientSex = name, name, "", ""
    d.StudyInstanceUID, d.StudyID, d.StudyDate, d.StudyTime = uid(name, "study"), "1", "", ""
    d.AccessionNumber, d.ReferringPhysicianName, d.StudyDescription = "", "", f"SPD-SAM sample {name}"
    d.SeriesInstanceUID, d.SeriesNumber, d.SeriesDescription = uid(name, "series"), 1, name
    d.Modality, d.Manufacturer = modality, "SPD-SAM nifti_to_dicom"
    d.FrameOfReferenceUID, d.PositionReferenceIndicator = uid(name, "frame of reference"), ""
    d.SOPClassUID, d.ImageType, d.AcquisitionNumber = SOP_CLASSES[modality], ["DERIVED", "SECONDARY"], 1
    d.Columns, d.Rows = shape[0], shape[1]
    d.PixelSpacing = ds(geo.spacing[1], geo.spacing[0])  # between rows (j), between columns (i)
    d.SliceThickness = d.SpacingBetweenSlices = ds(geo.spacing[2])[0]
    d.ImageOrientationPatient = ds(*geo.row, *geo.column)
    d.SamplesPerPixel, d.PhotometricInterpretation = 1, "MONOCHROME2"
    d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation = 16, 16, 15, 0
    if modality == "CT":
        d.KVP = ""
    else:
        d.ScanningSequence, d.SequenceVariant, d.MRAcquisitionType = "RM", "NONE", "3D"
        d.ScanOptions, d.RepetitionTime, d.EchoTime, d.EchoTrainLength = "", "", "", ""
    if modality == "CT" or (slope, intercept) != (1.0, 0.0):
        d.RescaleSlope, d.RescaleIntercept = ds(slope)[0], ds(intercept)[0]
    return d


def slice_file(series: Dataset, k: int, pixels: np.ndarray, geo: Geometry) -> FileDataset:
    """One slice: ``pixels`` is the stored k slice indexed (i, j)."""
    instance_uid = uid(str(series.PatientID), f"instance {k}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = series.SOPClassUID, instance_uid
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    d = FileDataset("", copy.deepcopy(series), file_meta=meta, preamble=b"\0" * 128)
    d.is_little_endian, d.is_implicit_VR = True, False
    d.SOPInstanceUID, d.InstanceNumber = instance_uid, k + 1
    d.ImagePositionPatient = ds(*geo.positions[k])
    d.SliceLocation = ds(geo.positions[k] @ np.cross(geo.row, geo.column))[0]
    d.PixelData = np.ascontiguousarray(pixels.T).tobytes()  # rows along j, columns along i
    return d


def nifti_to_dicom(nifti: Path, out_dir: Path, modality: str | None = None) -> DicomSeries:
    """Write ``nifti`` as a DICOM series of one file per k slice into ``out_dir``.

    Args:
        nifti: a 3D NIfTI volume with a right-handed, unsheared affine.
        out_dir: folder for the files (created; files of the same name are overwritten).
        modality: "CT" or "MR"; by default CT when the minimum is below -900.
    """
    image = nib.load(str(nifti))
    data = np.asanyarray(image.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{nifti}: expected a 3D volume, got shape {data.shape}")
    modality = modality or guess_modality(data)
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASSES)}, got {modality!r}")
    geo = geometry(image.affine, data.shape[2])
    stored, slope, intercept = encode(data)
    name = volume_name(nifti)
    series = series_dataset(name, modality, data.shape, geo, slope, intercept)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(data.shape[2]):
        files.append(out_dir / f"{name}_{k + 1:04d}.dcm")
        slice_file(series, k, stored[:, :, k], geo).save_as(files[-1], write_like_original=False)
    return DicomSeries(name, modality, str(series.StudyInstanceUID), str(series.SeriesInstanceUID), files)


def read_series(series_dir: Path) -> sitk.Image:
    """The series in ``series_dir`` as ITK (and MONAI Label's DICOMweb datastore) reads it."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    return reader.Execute()


def compare(nifti: Path, series_dir: Path) -> list[str]:
    """Differences between a NIfTI and its DICOM series, both read with SimpleITK; empty when they agree.

    Values may differ by half a quantisation step (see ``encode``); geometry by 1e-4 mm.
    """
    expected, got = sitk.ReadImage(str(nifti)), read_series(series_dir)
    problems = []
    for what in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        a, b = np.array(getattr(expected, what)()), np.array(getattr(got, what)())
        if a.shape != b.shape or not np.allclose(a, b, atol=TOLERANCE_MM, rtol=0):
            problems.append(f"{what[3:].lower()}: NIfTI {a.tolist()}, DICOM {b.tolist()}")
    if not problems:
        a = sitk.GetArrayViewFromImage(expected).transpose(2, 1, 0).astype(np.float64)
        b = sitk.GetArrayViewFromImage(got).transpose(2, 1, 0).astype(np.float64)
        step = encode(np.asanyarray(nib.load(str(nifti)).dataobj))[1]
        worst = float(np.abs(a - b).max())
        if worst > step / 2 + 1e-6 * max(1.0, float(np.abs(a).max())):
            problems.append(f"voxel values differ by up to {worst:g} (quantisation step {step:g})")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("nifti", type=Path, help="input .nii or .nii.gz")
    parser.add_argument("out_dir", type=Path, help="output folder for the series")
    parser.add_argument("--modality", choices=sorted(SOP_CLASSES), help="default: CT when the minimum is below -900")
    parser.add_argument("--verify", action="store_true", help="read the series back with SimpleITK and compare")
    args = parser.parse_args()
    series = nifti_to_dicom(args.nifti, args.out_dir, args.modality)
    print(f"{series.name}: {len(series.files)} {series.modality} slices, SeriesInstanceUID {series.series_uid}")
    problems = compare(args.nifti, args.out_dir) if args.verify else []
    if problems:
        raise SystemExit("verify failed:\n  " + "\n  ".join(problems))
    if args.verify:
        print("verify: same voxel indices, values and geometry as the NIfTI")


if __name__ == "__main__":
    main()
