"""Integration: SPD-SAM served from a real Orthanc PACS over DICOMweb, driven as 3D Slicer drives it.

Two sample volumes become DICOM series (the Colin27 T1 as MR, the head CT as CT) in a private
Orthanc; a real MONAI Label server runs on Orthanc's DICOMweb root, with the venv's bin folder left
off its PATH as when an operator calls ``.venv/bin/python -m monailabel.main`` without activating it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import local_server
import monailabel.interfaces.app as monailabel_app
import nibabel as nib
import numpy as np
import orthanc
import pydicom_seg
import pytest
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from monailabel.client import MONAILabelClient
from monailabel.config import Settings
from nifti_to_dicom import DicomSeries, compare, nifti_to_dicom
from pydicom import dcmread
from pydicom.dataset import Dataset

from lib.spd.training import ClickStyle, simulate_clicks

pytestmark = pytest.mark.server

LABELS = json.loads((Path(__file__).resolve().parents[1] / "apps/spd_sam/labels.json").read_text())
MR, CT = "colin27_t1", "invesalius_head_ct"
RIGHT_CAUDATE = LABELS["right_caudate"]
RIGHT_EYE_CLICKS = [[155, 184, 34], [154, 185, 40], [154, 186, 46]]  # centre of the right globe, every 6th slice


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> orthanc.OrthancServer:
    """A private Orthanc for this module (installed with apt-get when missing)."""
    try:
        server = orthanc.start(tmp_path_factory.mktemp("orthanc"))
    except RuntimeError as error:
        pytest.skip(f"Orthanc could not be installed or started: {error}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def series(pacs, sample_studies, tmp_path_factory) -> dict[str, DicomSeries]:
    """The MR and the CT sample volumes as DICOM series, uploaded to Orthanc."""
    folder = tmp_path_factory.mktemp("dicom")
    written = {name: nifti_to_dicom(sample_studies / f"{name}.nii.gz", folder / name) for name in (MR, CT)}
    for one in written.values():
        pacs.upload(one.files)
    return written


@pytest.fixture(scope="module")
def server_temp(tmp_path_factory) -> Path:
    """The temp folder of the server and its train and scoring subprocesses (``TMPDIR``)."""
    return tmp_path_factory.mktemp("server_temp")


@pytest.fixture(scope="module")
def dicomweb_server(pacs, series, server_temp, tmp_path_factory) -> local_server.LocalServer:
    """One MONAI Label server for the module on Orthanc's DICOMweb root."""
    env_bin = Path(sys.executable).parent.resolve()
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p).resolve() != env_bin)
    running = local_server.start(tmp_path_factory.mktemp("dicomweb_server"), pacs.dicomweb_url,
                                 env={"PATH": path, "TMPDIR": str(server_temp)})
    yield running
    running.stop()
    print(f"\nserver log: {running.log}")


@pytest.fixture(scope="module")
def client(dicomweb_server, tmp_path_factory) -> MONAILabelClient:
    """A client with its own folder for results: in the shared temp folder the server's clean-up of its copy
    (same file name) can delete the client's before the test reads it."""
    return MONAILabelClient(dicomweb_server.url, tmpdir=str(tmp_path_factory.mktemp("client")))


@pytest.fixture(scope="module")
def atlas_caudate(sample_studies) -> np.ndarray:
    """The atlas's right caudate on the Colin27 grid (bool, i j k)."""
    return np.asarray(nib.load(sample_studies / "labels" / "final" / f"{MR}.nii.gz").dataobj) == RIGHT_CAUDATE


@pytest.fixture(scope="module")
def caudate_clicks(atlas_caudate) -> list[list[int]]:
    """Rough clicks along the right caudate, every 6th axial slice, as voxel indices."""
    clicks, _ = simulate_clicks(atlas_caudate, (1, 1, 1), axis=2,
                                style=ClickStyle(every=6, drift_mm=2.0, off_target=0.0), rng=np.random.default_rng(7))
    return clicks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def write_label(mask: np.ndarray, like: Path, path: Path) -> Path:
    """``mask`` as a uint8 NIfTI on the grid of ``like`` (value 1 = the first segment, as Slicer exports it)."""
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), nib.load(like).affine), path)
    return path


def seg_instances(pacs: orthanc.OrthancServer, source: DicomSeries) -> list[Dataset]:
    """The DICOM-SEG instances in Orthanc that reference ``source``, found with QIDO and fetched with WADO."""
    web = DICOMwebClient(pacs.dicomweb_url)
    found = []
    for meta in web.search_for_series(search_filters={"Modality": "SEG", "StudyInstanceUID": source.study_uid}):
        found += web.retrieve_series(source.study_uid, Dataset.from_json(meta).SeriesInstanceUID)
    return [ds for ds in found if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_uid]


def slice_positions(source: DicomSeries) -> dict[str, np.ndarray]:
    """SOPInstanceUID -> ImagePositionPatient of every slice of the source series."""
    headers = [dcmread(f, stop_before_pixels=True) for f in source.files]
    return {h.SOPInstanceUID: np.array(h.ImagePositionPatient, dtype=float) for h in headers}


@pytest.mark.parametrize("operator_filter, expected", [
    (None, {"Modality": "CT,MR"}),
    ('{"Modality": "MR"}', {"Modality": "MR"}),
])
def test_search_filter_lists_ct_and_mr_unless_the_operator_sets_it(monkeypatch, tmp_path, operator_filter, expected):
    import main as app_main

    if operator_filter:
        monkeypatch.setenv("MONAI_LABEL_DICOMWEB_SEARCH_FILTER", operator_filter)
    else:
        monkeypatch.delenv("MONAI_LABEL_DICOMWEB_SEARCH_FILTER", raising=False)
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after the dcmqi look-up
    settings = Settings()
    monkeypatch.setattr(app_main, "settings", settings)
    monkeypatch.setattr(monailabel_app, "settings", settings)
    monkeypatch.setattr(monailabel_app, "DICOMWebDatastore", lambda **kwargs: kwargs)
    app = object.__new__(app_main.SPDSamApp)
    app.studies, app.app_dir = "http://127.0.0.1:9/dicom-web", str(tmp_path)
    assert app._init_dicomweb_datastore()["search_filter"] == expected
    assert Settings().MONAI_LABEL_DICOMWEB_SEARCH_FILTER == expected, "train and scoring subprocesses list the same"


def test_series_keep_the_nifti_voxel_grid(series, sample_studies):
    for name, one in series.items():
        assert compare(sample_studies / f"{name}.nii.gz", one.files[0].parent) == [], name
    assert series[MR].modality == "MR" and series[CT].modality == "CT"


def test_start_up_downloads_nothing_and_finds_the_dicom_seg_writer(dicomweb_server):
    log = dicomweb_server.log_tail(200_000)
    assert "DICOM-SEG writer:" in log and "itkimage2segimage not found" not in log
    assert "github.com/QIICR" not in log


def test_info_lists_the_mr_series_as_well_as_the_ct(client, series):
    info = client.info()
    assert info["models"]["spd_sam"]["type"] == "deepgrow"
    assert info["datastore"]["total"] == len(series)


def test_clicks_on_the_mr_series_segment_the_caudate_in_place(client, series, atlas_caudate, caudate_clicks,
                                                              sample_studies):
    params = {"label": "right_caudate", "foreground": caudate_clicks, "background": []}
    result_file, result = client.infer("spd_sam", series[MR].series_uid, params)
    mask = nib.load(result_file)
    assert mask.shape == atlas_caudate.shape
    np.testing.assert_allclose(mask.affine, nib.load(sample_studies / f"{MR}.nii.gz").affine, atol=1e-4)
    score = dice(np.asarray(mask.dataobj) > 0, atlas_caudate)
    print(f"right caudate Dice in place {score:.3f}; timing {result['timing']}")
    assert score >= 0.5
    assert result["label_names"] == {"right_caudate": RIGHT_CAUDATE}


def test_final_label_is_written_to_orthanc_as_dicom_seg(client, pacs, series, atlas_caudate, sample_studies,
                                                        tmp_path):
    label = write_label(atlas_caudate, sample_studies / f"{MR}.nii.gz", tmp_path / "right_caudate.nii.gz")
    client.save_label(series[MR].series_uid, str(label), tag="final",
                      params={"label_info": [{"name": "right_caudate", "idx": 1}]})

    segs = seg_instances(pacs, series[MR])
    assert len(segs) == 1, "one DICOM-SEG for the saved label"
    seg = segs[0]
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == series[MR].study_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["right_caudate"]

    positions = slice_positions(series[MR])
    labelled = {uid for k, uid in enumerate(positions) if atlas_caudate[:, :, k].any()}
    frames = seg.PerFrameFunctionalGroupsSequence
    sources = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID for f in frames]
    assert set(sources) == labelled, "one frame per source slice where the label is non-zero"
    for frame, source in zip(frames, sources):
        np.testing.assert_allclose(np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float),
                                   positions[source], atol=1e-3)

    segment = pydicom_seg.SegmentReader().read(seg).segment_image(1)
    grid = sitk.ReadImage(str(sample_studies / f"{MR}.nii.gz"))
    on_grid = sitk.Resample(segment, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert np.array_equal(sitk.GetArrayFromImage(on_grid).transpose(2, 1, 0) > 0, atlas_caudate)


def test_slicer_order_next_sample_infer_save(client, pacs, series, sample_studies, tmp_path):
    assert "spd_sam" in client.info()["models"]
    sample = client.next_sample("first", {})
    assert sample["id"] == min(one.series_uid for one in series.values()), "'first' proposes the lowest series UID"
    assert sample["id"] == series[CT].series_uid

    result_file, result = client.infer("spd_sam", sample["id"], {"foreground": RIGHT_EYE_CLICKS, "background": []})
    mask = nib.load(result_file)
    np.testing.assert_allclose(mask.affine, nib.load(sample_studies / f"{CT}.nii.gz").affine, atol=1e-4)
    eye = np.asarray(mask.dataobj) > 0
    print(f"right eye: {eye.sum()} voxels, slices {result['slice_range']}; timing {result['timing']}")
    assert all(eye[tuple(c)] for c in RIGHT_EYE_CLICKS)
    assert eye.sum() < 20_000, "a globe, not the head"

    label = write_label(eye, sample_studies / f"{CT}.nii.gz", tmp_path / "right_eye.nii.gz")
    client.save_label(sample["id"], str(label), tag="final", params={"label_info": [{"name": "right_eye", "idx": 1}]})
    segs = seg_instances(pacs, series[CT])
    assert [[s.SegmentLabel for s in seg.SegmentSequence] for seg in segs] == [["right_eye"]]



def test_slicer_order_continued_train_then_infer_again(client, series, atlas_caudate, caudate_clicks, sample_studies,
                                                       tmp_path):
    """Train from the final label saved over DICOMweb; the next infer serves the published model."""
    label = tmp_path / "right_caudate.nii.gz"
    nib.save(nib.Nifti1Image(atlas_caudate.astype(np.uint8) * RIGHT_CAUDATE,
                             nib.load(sample_studies / f"{MR}.nii.gz").affine), label)
    client.save_label(series[MR].series_uid, str(label), tag="final",
                      params={"label_info": [{"name": "right_caudate", "idx": RIGHT_CAUDATE}]})
    client.train_start("spd_sam", {"labels": "right_caudate", "val_fraction": 0, "max_minutes": 1.5,
                                   "max_epochs": 1, "head_epochs": 10})
    deadline = time.monotonic() + 480
    status = client.train_status()
    while status["status"] in ("SUBMITTED", "RUNNING") and time.monotonic() < deadline:
        time.sleep(3)
        status = client.train_status()
    assert status["status"] == "DONE", "\n".join(status.get("details") or [])
    stats = client.info()["train_stats"]["spd_sam"]
    assert stats["version"] == 1 and series[MR].series_uid in stats["train_volumes"]

    params = {"label": "right_caudate", "foreground": caudate_clicks, "background": []}
    result_file, result = client.infer("spd_sam", series[MR].series_uid, params)
    assert result["model_version"] == 1, "the infer process picked up the new checkpoint without a restart"
    score = dice(np.asarray(nib.load(result_file).dataobj) > 0, atlas_caudate)
    print(f"right caudate Dice after training on it: {score:.3f}")
    assert score >= 0.5


def test_converted_series_and_labels_leave_nothing_in_the_temp_folder(client, series, caudate_clicks, server_temp):
    """Every series (and DICOM-SEG label) converted to NIfTI in this module is kept in the datastore's cache
    only: MONAI Label leaves each conversion in the temp folder, which fills a long-running server's disk."""
    params = {"label": "right_caudate", "foreground": caudate_clicks, "background": []}
    for _ in range(2):  # the first request converts the series unless an earlier test did, the second reads the copy
        result_file, _ = client.infer("spd_sam", series[MR].series_uid, params)
        assert (np.asarray(nib.load(result_file).dataobj) > 0).sum() > 0
    left = sorted(p.name for p in server_temp.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    assert left == [], f"conversions left in the server's temp folder: {left}"
