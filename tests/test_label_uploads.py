"""Label saves are all-or-nothing: a copy cut short by the kernel (file-size limit) keeps the previous label,
and label and datastore files are replaced atomically (tests/test_kill9.py SIGKILLs a server during saves)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore

from lib.datastore.label_uploads import (
    AtomicLabelFiles,
    CheckedLabelSaves,
    check_label_file,
    checked_class,
    with_checked_label_saves,
)

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "spd_sam"


def _volume(path: Path, shape=(20, 20, 10), value: int = 1) -> Path:
    nib.save(nib.Nifti1Image(np.full(shape, value, np.uint8), np.eye(4)), path)
    return path


def test_label_file_checks(tmp_path):
    image = _volume(tmp_path / "image.nii.gz")
    check_label_file(str(_volume(tmp_path / "ok.nii.gz")), str(image))
    with pytest.raises(HTTPException, match="differs") as error:
        check_label_file(str(_volume(tmp_path / "small.nii.gz", (20, 20, 9))), str(image))
    assert error.value.status_code == 400
    noisy = tmp_path / "noisy.nii.gz"  # random voxels: the gzip stream is long enough to cut in the data
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 9, (20, 20, 10), dtype=np.uint8), np.eye(4)), noisy)
    for keep in (60, noisy.stat().st_size // 2, noisy.stat().st_size - 9):
        truncated = tmp_path / "truncated.nii.gz"
        truncated.write_bytes(noisy.read_bytes()[:keep])
        with pytest.raises(HTTPException, match="unreadable"):
            check_label_file(str(truncated), str(image))


def _studies(tmp_path: Path, shape=(64, 64, 64)) -> Path:
    """A studies folder with two images, ``case`` (with a final label of 1s) and ``fresh`` (no label)."""
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for name in ("case", "fresh"):
        _volume(studies / f"{name}.nii.gz", shape, 0)
    _volume(studies / "labels" / "final" / "case.nii.gz", shape, 1)
    return studies


def test_a_save_cut_short_keeps_the_previous_label(tmp_path):
    """A child process saves a 100 kB label under a 64 kB file-size limit (EFBIG, as a full disk gives ENOSPC),
    over a previous label and as a first label."""
    studies = _studies(tmp_path)
    previous = (studies / "labels" / "final" / "case.nii.gz").read_bytes()
    incoming = tmp_path / "incoming.nii.gz"  # the same extension: replaces the previous file
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 9, (64, 64, 64), dtype=np.uint8), np.eye(4)), incoming)
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(APP_DIR)!r})
        from fastapi import HTTPException
        from monailabel.datastore.local import LocalDatastore
        from lib.datastore.label_uploads import with_checked_label_saves
        store = with_checked_label_saves(LocalDatastore({str(studies)!r}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        for image in ("case", "fresh"):
            try:
                store.save_label(image, {str(incoming)!r}, "final", {{}})
            except HTTPException as error:
                print(error.status_code, error.detail)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("507 ") for line in lines), out.stdout + out.stderr
    assert "previous label of case is unchanged" in lines[0]
    final = studies / "labels" / "final"
    assert (final / "case.nii.gz").read_bytes() == previous
    assert sorted(p.name for p in final.iterdir()) == ["case.nii.gz"], "no half-written file, no temp file left"
    listed = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    assert listed["case"]["labels"]["final"]["ext"] == ".nii.gz" and not listed["fresh"]["labels"]


def test_a_save_replaces_the_label_and_the_datastore_file(tmp_path):
    studies = _studies(tmp_path)
    store = with_checked_label_saves(LocalDatastore(str(studies)))
    config = studies / "datastore_v2.json"
    config.chmod(0o640)
    inode = config.stat().st_ino
    new = _volume(tmp_path / "new.nii", (64, 64, 64), 3)  # another extension than the previous label
    assert store.save_label("case", str(new), "final", {"user": "a"}) == "case"
    final = studies / "labels" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["case.nii"], "the .nii.gz label of case is replaced"
    assert np.asarray(nib.load(final / "case.nii").dataobj).max() == 3
    assert config.stat().st_ino != inode and config.stat().st_mode & 0o777 == 0o640, "renamed over, same permissions"
    label = json.loads(config.read_text())["objects"]["case"]["labels"]["final"]
    assert label["ext"] == ".nii" and label["info"]["user"] == "a" and label["info"]["name"] == "case.nii"
    assert LocalDatastore(str(studies)).get_label_by_image_id("case", "final") == "case", "a new instance reads it"
    with pytest.raises(HTTPException) as error:
        store.save_label("case", str(_volume(tmp_path / "small.nii.gz", (64, 64, 63))), "final", {})
    assert error.value.status_code == 400 and (final / "case.nii").is_file()


def test_the_atomic_save_sits_below_a_subclass_s_own_save():
    """DICOMweb's save_label (DICOM-SEG upload, then LocalDatastore's save of a local copy) keeps running,
    and its local copy goes through the atomic save."""
    mro = checked_class(DICOMWebDatastore).__mro__
    assert mro[:4] == (mro[0], CheckedLabelSaves, DICOMWebDatastore, AtomicLabelFiles) and mro[4] is LocalDatastore
    assert checked_class(LocalDatastore).__mro__[1:4] == (CheckedLabelSaves, AtomicLabelFiles, LocalDatastore)
