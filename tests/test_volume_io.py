"""Result files: written with the image's geometry into the server's own temp folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import SimpleITK as sitk

from lib.volume_io import VolumeReader, results_dir, results_prefix, volume_id, write_label


def test_results_go_to_a_private_folder_that_is_made_again_if_removed():
    reference = sitk.Image(4, 5, 6, sitk.sitkInt16)
    reference.SetSpacing((0.5, 1.0, 2.0))
    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    mask[1, 2, 3] = 7
    path = write_label(mask, reference, ".nii.gz", "uint8", True)
    assert os.path.dirname(path) == results_dir() != tempfile.gettempdir()
    written = sitk.ReadImage(path)
    assert written.GetSpacing() == (0.5, 1.0, 2.0)
    assert np.array_equal(sitk.GetArrayFromImage(written).transpose(2, 1, 0), mask)
    shutil.rmtree(results_dir())  # as a temp cleaner might, on a server that runs for weeks
    again = write_label(mask, reference, ".nrrd", "uint8", False)
    assert os.path.dirname(again) == results_dir() and os.path.exists(again)
    os.unlink(again)


def test_a_process_removes_its_result_folder_when_it_exits(tmp_path):
    """A server that is restarted for weeks leaves no folder per run in the temp folder."""
    program = ("import sys; sys.path.insert(0, 'apps/spd_sam'); import numpy as np, SimpleITK as sitk; "
               "from lib.volume_io import write_label; "
               "print(write_label(np.ones((2, 2, 2), np.uint8), sitk.Image(2, 2, 2, sitk.sitkInt16), '.nrrd', 'uint8', False))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TMPDIR=str(tmp_path))
    written = subprocess.run([sys.executable, "-c", program], cwd=root, env=env, capture_output=True, text=True,
                             check=True).stdout.strip()
    assert os.path.dirname(written).startswith(str(tmp_path))  # it was written there ...
    assert os.listdir(tmp_path) == []  # ... and the folder went with the process


def test_result_folders_of_processes_that_are_gone_are_removed_by_the_next_one(tmp_path):
    """A served process ends by a signal that skips exit handlers; the next server removes what it left."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = tmp_path / f"{results_prefix()}{gone.pid}_abc123"
    (orphan / "nested").mkdir(parents=True)
    (orphan / "nested" / "label.nii.gz").write_bytes(b"x")
    alive = tmp_path / f"{results_prefix()}{os.getpid()}_def456"  # a running process's folder stays
    alive.mkdir()
    elsewhere = tmp_path / f"spd_sam_results_otherhost_{gone.pid}_ghi789"  # another container's: left alone
    elsewhere.mkdir()
    other = tmp_path / "spd_sam_results_notapid"  # not a name this module makes: left alone
    other.mkdir()
    program = ("import sys; sys.path.insert(0, 'apps/spd_sam'); from lib.volume_io import results_dir; "
               "print(results_dir())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", program], cwd=root, env=dict(os.environ, TMPDIR=str(tmp_path)), check=True)
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, elsewhere.name, other.name])


def test_a_replaced_file_gets_a_new_volume_id(tmp_path):
    path = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(path))
    first = volume_id(str(path))
    assert volume_id(str(path)) == first
    assert VolumeReader().read(str(path)).volume_id == first
    os.utime(path, ns=(0, 10**9))
    assert volume_id(str(path)) != first
