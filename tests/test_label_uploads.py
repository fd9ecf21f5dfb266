"""Label saves are all-or-nothing: a copy cut short by the kernel (file-size limit) keeps the previous label."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi import HTTPException

from lib.datastore.label_uploads import check_label_file, previous_label_kept

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


def test_a_save_cut_short_keeps_the_previous_label(tmp_path):
    """A child process copies a 1 MB label under a 64 kB file-size limit (EFBIG, as a full disk gives ENOSPC)."""
    folder = tmp_path / "labels" / "final"
    folder.mkdir(parents=True)
    previous = folder / "case.nii"
    previous.write_bytes(b"previous label" * 100)
    incoming = tmp_path / "incoming.nii"
    incoming.write_bytes(np.random.default_rng(0).bytes(1 << 20))
    script = textwrap.dedent(f"""
        import resource, shutil, signal, sys
        sys.path.insert(0, {str(APP_DIR)!r})
        from fastapi import HTTPException
        from lib.datastore.label_uploads import previous_label_kept
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        try:
            with previous_label_kept({str(folder)!r}, "case"):
                shutil.copy({str(incoming)!r}, {str(previous)!r})
        except HTTPException as error:
            print(error.status_code, error.detail)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("507 "), out.stdout + out.stderr
    assert "previous label of case is unchanged" in out.stdout
    assert previous.read_bytes() == b"previous label" * 100
    assert sorted(p.name for p in folder.iterdir()) == ["case.nii"], "no half-written file, no backup left behind"


def test_a_failed_first_save_leaves_nothing(tmp_path):
    folder = tmp_path / "final"
    folder.mkdir()
    with pytest.raises(HTTPException) as error:
        with previous_label_kept(str(folder), "case"):
            (folder / "case.nii.gz").write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert error.value.status_code == 507 and list(folder.iterdir()) == []
