"""Atomic writes, and the temp files a killed writer leaves behind."""

import os
import time

import pytest

from lib.spd.atomic_files import remove_stale_temps, replacing, write_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "label.nii.gz"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["label.nii.gz"]


def test_stale_temps_of_killed_writes_are_deleted_and_nothing_else(tmp_path):
    (tmp_path / "labels" / "final").mkdir(parents=True)
    stale = [tmp_path / "labels" / "final" / ".colin27_t1.nii.gz.k3j2x9.tmp", tmp_path / ".datastore_v2.json.a1b2.tmp"]
    fresh = tmp_path / ".v0003.pt.zz12.tmp"  # a write that may still be in progress
    kept = [tmp_path / "labels" / "final" / "colin27_t1.nii.gz", tmp_path / ".hidden", tmp_path / "notes.tmp"]
    for path in stale + [fresh] + kept:
        path.write_bytes(b"x")
    old = time.time() - 3600
    for path in stale + kept:
        os.utime(path, (old, old))
    assert remove_stale_temps(tmp_path, older_than_s=60) == 2
    assert not any(p.exists() for p in stale) and fresh.exists() and all(p.exists() for p in kept)
    assert remove_stale_temps(tmp_path / "missing") == 0
