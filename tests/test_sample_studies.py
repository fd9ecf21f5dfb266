"""Tests for scripts/make_sample_studies.py (needs mricron-data and invesalius-examples)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_sample_studies.py"
LABELS = json.loads((ROOT / "apps" / "spd_sam" / "labels.json").read_text())
IMAGES = ["colin27_t1", "inia19_macaque_t1", "mni152_t1", "invesalius_head_ct"]


def load_script() -> ModuleType:
    """Import the script as a module from its file path."""
    spec = importlib.util.spec_from_file_location("make_sample_studies", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def datastore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the script twice into one folder (the second run must overwrite cleanly)."""
    module = load_script()
    missing = [str(p) for p in module.SOURCES if not p.is_file()]
    if missing:
        pytest.skip(f"source data not installed: {missing}")
    out = tmp_path_factory.mktemp("studies")
    module.main(["--out", str(out)])
    module.main(["--out", str(out)])
    return out


def test_only_expected_files(datastore: Path) -> None:
    files = sorted(str(p.relative_to(datastore)) for p in datastore.rglob("*") if p.is_file())
    expected = sorted([f"{name}.nii.gz" for name in IMAGES] + ["labels/final/colin27_t1.nii.gz"])
    assert files == expected


def test_colin27_label_matches_image(datastore: Path) -> None:
    image = nib.load(datastore / "colin27_t1.nii.gz")
    label = nib.load(datastore / "labels" / "final" / "colin27_t1.nii.gz")
    assert label.shape == image.shape == (181, 217, 181)
    assert np.allclose(label.affine, image.affine)
    assert label.get_data_dtype() == np.uint8
    values = set(np.unique(np.asanyarray(label.dataobj)).tolist()) - {0}
    assert values == set(LABELS.values())


def test_right_caudate_size_and_side(datastore: Path) -> None:
    label = nib.load(datastore / "labels" / "final" / "colin27_t1.nii.gz")
    assert nib.aff2axcodes(label.affine) == ("R", "A", "S")
    mask = np.asanyarray(label.dataobj) == LABELS["right_caudate"]
    assert 2000 < mask.sum() < 15000  # 1 mm voxels: a few cm^3
    centroid = nib.affines.apply_affine(label.affine, np.argwhere(mask).mean(axis=0))
    assert centroid[0] > 5  # RAS+: the subject's right is +x


def test_ct_is_hounsfield_with_real_spacing(datastore: Path) -> None:
    ct = nib.load(datastore / "invesalius_head_ct.nii.gz")
    data = np.asanyarray(ct.dataobj)
    assert data.dtype == np.int16
    assert -1100 <= data.min() <= -900  # air
    assert np.percentile(data, 99.9) > 1000  # cortical bone
    assert sorted(ct.header.get_zooms()) == pytest.approx([0.957, 0.957, 1.5], abs=1e-3)


def test_missing_source_names_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_script()
    monkeypatch.setattr(module, "SOURCES", {Path("/nonexistent/ch2.nii.gz"): "mricron-data"})
    with pytest.raises(SystemExit, match="apt-get install mricron-data"):
        module.check_sources()
