"""kill -9 of a real server at its risky moments, then a restart on the same workdir: nothing lost or corrupted.

Each test runs ``scripts/local_server.py``'s server in a session of its own and SIGKILLs the whole
process group (the server and its training subprocess, as a crash or an OOM kill would) at a moment
found by watching the files it writes, then starts it again on the same folders:

* a label save (``PUT /datastore/label``, as the 3D Slicer plugin sends it): the label is the previous
  one or the new one, complete, and the datastore file still lists every label;
* background embedding: the slices written before the kill are used and a mask is the same as on a
  volume that was never interrupted, with no error in the log;
* a training round's publication: the server serves the previous version or the complete new one.

Whatever moment a kill hits, the asserted property must hold; which outcome each kill had is printed.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import local_server
import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from make_cohort import make_cohort, write_cohort
from monailabel.client import MONAILabelClient

from lib.spd.serving import CheckpointStore
from lib.spd.training import ClickStyle, simulate_clicks
from lib.volume_io import volume_id

pytestmark = pytest.mark.server

LABELS = json.loads((Path(__file__).resolve().parents[1] / "apps/spd_sam/labels.json").read_text())
ERRORS = ("Traceback", "[ERROR]", "damaged file")  # in a log: a 500, a refused checkpoint, a corrupt cache file


class Restarts:
    """The server started again and again on one workdir, each run with its own log (``server-<n>.log``)."""

    def __init__(self, workdir: Path, conf: dict[str, str] | None = None):
        self.workdir, self.conf = workdir, conf
        self.runs: list[local_server.LocalServer] = []

    def start(self) -> local_server.LocalServer:
        self.runs.append(local_server.start(self.workdir, self.workdir / "studies", self.conf, own_group=True,
                                            log_name=f"server-{len(self.runs) + 1}.log"))
        return self.runs[-1]

    def current(self) -> local_server.LocalServer:
        """The last run if it is still up, else a new one."""
        return self.runs[-1] if self.runs and self.runs[-1].process.poll() is None else self.start()

    def stop(self) -> None:
        for run in self.runs:
            run.stop()


def client_for(server: local_server.LocalServer) -> MONAILabelClient:
    (server.log.parent / "client").mkdir(exist_ok=True)
    return MONAILabelClient(server.url, tmpdir=str(server.log.parent / "client"))


def kill_when(server: local_server.LocalServer, happened: Callable[[], bool], delay_s: float = 0.0,
              timeout_s: float = 120.0) -> bool:
    """Poll ``happened()`` in a tight loop and SIGKILL the server's process group ``delay_s`` after it first
    holds (or at the timeout, or at once if the server exited). Returns whether it held."""
    deadline = time.monotonic() + timeout_s
    seen = False
    while not seen and time.monotonic() < deadline and server.process.poll() is None:
        seen = happened()
    if seen and delay_s:
        time.sleep(delay_s)
    server.kill()
    return seen


def in_background(call: Callable[[], object]) -> threading.Thread:
    """Run a request that the kill will cut short (its connection error is expected and ignored)."""
    def run():
        try:
            call()
        except Exception:
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def folder_state(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Entries of ``folder`` with inode, size and mtime: any write, rename or removal changes it."""
    state = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            state[entry.name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return state


def assert_clean_log(server: local_server.LocalServer) -> None:
    log = server.log.read_text(errors="replace")
    found = [word for word in ERRORS if word in log]
    assert not found, f"{found} in {server.log}:\n{server.log_tail()}"


# 1. A label save -----------------------------------------------------------------------------------------------

IMAGE, OTHER = "colin27_t1", "mni152_t1"
SAVE_DELAYS_S = (0.0, 0.01, 0.3)  # after the label folder first changes: early in the copy, later, mostly after


def _uncompressed_nifti_gz(array: np.ndarray, path: Path) -> Path:
    """A .nii.gz with stored (level 0) gzip blocks: 7 MB for Colin27's grid, so a save takes a while to copy."""
    raw = path.with_suffix("")
    nib.save(nib.Nifti1Image(array, np.eye(4)), raw)
    path.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=0))
    raw.unlink()
    return path


def test_a_kill_during_a_label_save_keeps_the_previous_or_the_new_label(tmp_path_factory, sample_studies, tmp_path):
    work = tmp_path_factory.mktemp("kill9_labels")
    shutil.copytree(sample_studies, work / "studies")
    final = work / "studies" / "labels" / "final"
    saved = final / f"{IMAGE}.nii.gz"
    shape = nib.load(work / "studies" / f"{IMAGE}.nii.gz").shape
    previous = np.asarray(nib.load(saved).dataobj)
    restarts = Restarts(work)
    try:
        server = restarts.start()
        other = np.zeros(nib.load(work / "studies" / f"{OTHER}.nii.gz").shape, np.uint8)
        other[90:100, 100:110, 80:90] = LABELS["left_caudate"]
        nib.save(nib.Nifti1Image(other, np.eye(4)), tmp_path / "other.nii.gz")
        client_for(server).save_label(OTHER, str(tmp_path / "other.nii.gz"), tag="final")
        outcomes = []
        for n, delay in enumerate(SAVE_DELAYS_S):
            new = np.random.default_rng(n).integers(0, 13, shape, dtype=np.uint8)
            upload = _uncompressed_nifti_gz(new, tmp_path / f"label{n}.nii.gz")
            before = folder_state(final)
            client = client_for(server)
            request = in_background(lambda: client.save_label(IMAGE, str(upload), tag="final"))
            seen = kill_when(server, lambda: folder_state(final) != before, delay)
            request.join(timeout=30)
            server = restarts.start()

            assert saved.is_file(), f"kill {n} ({delay * 1000:.0f} ms): the label of {IMAGE} is gone: " \
                                    f"{sorted(folder_state(final))}"
            try:
                label = np.asarray(nib.load(saved).dataobj)
            except Exception as error:
                pytest.fail(f"kill {n} ({delay * 1000:.0f} ms): the saved label is cut short: {error}")
            assert label.shape == shape
            outcome = "new" if np.array_equal(label, new) else "previous" if np.array_equal(label, previous) else None
            assert outcome, f"kill {n} ({delay * 1000:.0f} ms): the label is neither the previous one nor the new one"
            outcomes.append(f"{delay * 1000:.0f} ms after the first change{'' if seen else ' (none seen)'}: {outcome}")
            previous = label

            store = json.loads((work / "studies" / "datastore_v2.json").read_text())
            for image in (IMAGE, OTHER):
                assert store["objects"][image]["labels"]["final"]["ext"] == ".nii.gz", image
            listed = client_for(server).datastore()["objects"]
            assert {"final"} <= set(listed[IMAGE]["labels"]) and {"final"} <= set(listed[OTHER]["labels"])
            downloaded = requests.get(f"{server.url}/datastore/label", params={"label": IMAGE, "tag": "final"},
                                      timeout=60)
            assert downloaded.status_code == 200 and downloaded.content == saved.read_bytes()
        print("\nlabel saves killed:", "; ".join(outcomes))
        assert np.array_equal(np.asarray(nib.load(final / f"{OTHER}.nii.gz").dataobj), other)
        assert_clean_log(server)

        # temp files of writes that kills cut short (made old here: the ones above may be too young) go at start
        left = [final / f".{IMAGE}.nii.gz.x1y2z3.tmp", work / "studies" / ".datastore_v2.json.q9w8.tmp",
                work / "trained" / ".v0001.pt.e5r6.tmp"]
        for path in left:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"cut short")
            os.utime(path, (time.time() - 3600,) * 2)
        server.kill()
        server = restarts.start()
        assert not [p for p in left if p.exists()], "a restart deletes the temp files that kills left"
        assert "temp file(s) of writes cut short" in server.log.read_text(errors="replace")
    finally:
        restarts.stop()


# 2 and 3. Background embedding and a training round, on two copies of one small synthetic volume ----------------

REFERENCE, RESTARTED = "a_reference", "b_restarted"  # 'first' proposes unlabelled images in name order
STRUCTURE = "right_caudate"
SLICE_MM = 4.0
ROUND = {"labels": STRUCTURE, "max_epochs": 1, "head_epochs": 2, "max_minutes": 3, "train_minutes": 0.1,
         "publish": "always"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two identical copies of one cropped synthetic volume (85 x 102 x 12, 4 mm slices) without final labels,
    their labels kept aside, and one server workdir on them, restarted by the tests in turn."""
    work = tmp_path_factory.mktemp("kill9_cohort")
    subject = make_cohort(1, seed=3, labels=[STRUCTURE, "right_putamen"], crop_margin_mm=(25, 25, 4),
                          slice_mm=SLICE_MM)[0]
    copies = [dataclasses.replace(subject, name=name) for name in (REFERENCE, RESTARTED)]
    write_cohort(copies, work / "studies", label_dir=work / "labels")
    restarts = Restarts(work)
    yield work, subject, restarts
    restarts.stop()


def _slice_files(work: Path, image: str, axis: int = 2) -> Path:
    """The embedding cache folder of ``image`` along ``axis`` (keys start with the volume id and axis)."""
    cache = work / "cache" / "spd_embeddings"
    prefix = f"{volume_id(str(work / 'studies' / f'{image}.nii.gz'))}-ax{axis}-"
    folders = [p for p in cache.glob(f"{prefix}*") if "-at" not in p.name] if cache.is_dir() else []
    return folders[0] if folders else cache / f"{prefix}none"


def _npy(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.npy")} if folder.is_dir() else set()


def _wait_for_all_slices(work: Path, image: str, depth: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_npy(_slice_files(work, image))) < depth:
        assert time.monotonic() < deadline, f"background embedding of {image} did not finish"
        time.sleep(0.2)


def _infer(server, image: str, clicks) -> tuple[np.ndarray, dict]:
    params = {"label": STRUCTURE, "foreground": clicks, "background": [], "slice_axis": 2, "focus": False}
    result_file, result = client_for(server).infer("spd_sam", image, params)
    return np.asarray(nib.load(result_file).dataobj), result


def _clicks(subject) -> list[list[int]]:
    clicks, _ = simulate_clicks(subject.label == LABELS[STRUCTURE], (1.0, 1.0, SLICE_MM), 2, ClickStyle(3, 2.0, 0.0),
                                np.random.default_rng(5))
    return clicks


def test_a_kill_during_background_embedding_leaves_a_cache_that_gives_the_same_masks(cohort):
    """The reference copy is embedded in the background without interruption and segmented; the other copy's
    background embedding is killed while it writes slice files, resumed after the restart, and segmented:
    the masks must be identical (same embeddings: one slice at a time in both)."""
    work, subject, restarts = cohort
    depth = subject.image.shape[2]
    clicks = _clicks(subject)
    server = restarts.current()
    client = client_for(server)
    assert client.next_sample("first", {})["id"] == REFERENCE
    _wait_for_all_slices(work, REFERENCE, depth)
    reference, _ = _infer(server, REFERENCE, clicks)
    assert reference.any()
    client.save_label(REFERENCE, str(work / "labels" / f"{REFERENCE}.nii.gz"), tag="final")

    assert client.next_sample("first", {})["id"] == RESTARTED
    written = lambda: len(_npy(_slice_files(work, RESTARTED)))  # noqa: E731
    deadline = time.monotonic() + 120
    while written() < depth // 3:  # a few slices on disk, then kill as the next slice file appears
        assert time.monotonic() < deadline, f"background embedding of {RESTARTED} did not start"
        time.sleep(0.05)
    folder = _slice_files(work, RESTARTED)
    before = set(os.listdir(folder))
    kill_when(server, lambda: not before.issuperset(os.listdir(folder)), timeout_s=120)
    kept = _npy(folder)
    print(f"\nbackground embedding killed as a slice file appeared: {len(kept)}/{depth} slices on disk, "
          f"left over: {sorted(set(os.listdir(folder)) - kept) or 'nothing'}")
    assert 0 < len(kept) < depth
    shapes = {name: np.load(folder / name).shape for name in sorted(kept)}  # raises on a cut file
    assert len(set(shapes.values())) == 1, f"slice files of different sizes: {shapes}"

    server = restarts.start()
    assert client_for(server).next_sample("first", {})["id"] == RESTARTED, "the interrupted copy is still proposed"
    _wait_for_all_slices(work, RESTARTED, depth)
    assert kept <= _npy(folder), "slices embedded before the kill are kept"
    mask, result = _infer(server, RESTARTED, clicks)
    assert np.array_equal(mask, reference), f"{int((mask != reference).sum())} voxels differ from the reference"
    assert result["model_version"] is None
    assert_clean_log(server)


def test_a_kill_during_a_training_rounds_publication_serves_the_previous_or_the_new_version(cohort):
    """Two rounds: the first killed as its first file appears in the checkpoint folder, the second as its
    pointer is replaced. After each restart the served version is the one the pointer names, its checkpoint
    loads with weights_only=True, and an infer answers with that version."""
    work, subject, restarts = cohort
    store = CheckpointStore(work / "trained")
    server = restarts.current()
    client = client_for(server)
    listed = client.datastore()["objects"]
    for image in (REFERENCE, RESTARTED):
        if "final" not in listed[image]["labels"]:
            client.save_label(image, str(work / "labels" / f"{image}.nii.gz"), tag="final")
    clicks = _clicks(subject)
    moments = {  # what to watch for, given the version served before the round
        "the first publication file": lambda before: _has_entries(store.directory),
        "the pointer replaced": lambda before: store.current() != before,
    }
    outcomes = []
    for moment, happened in moments.items():
        before = store.current()
        client_for(server).train_start("spd_sam", ROUND)
        assert kill_when(server, lambda: happened(before), timeout_s=300), \
            f"the round did not reach {moment}:\n{server.log_tail()}"
        server = restarts.start()
        assert requests.get(f"{server.url}/info/", timeout=60).status_code == 200

        version, versions = store.current(), store.versions()
        assert version == before or (versions and version == max(versions)), \
            f"before the round: {_named(before)}; the pointer names {_named(version)}; checkpoints on disk: {versions}"
        if moment == "the pointer replaced":
            assert version is not None and version != before, "a replaced pointer names the new version"
        if version is not None:
            checkpoint = torch.load(store.path(version), map_location="cpu", weights_only=True)
            assert checkpoint["metadata"]["version"] == version and checkpoint["saliency_heads"]
            assert json.loads(store.path(version, ".json").read_text())["version"] == version
        mask, result = _infer(server, RESTARTED, clicks)
        assert result["model_version"] == version and mask.any()
        assert_clean_log(server)
        outcomes.append(f"killed at {moment}: serving {_named(version)} (before: {_named(before)})")
    print("\n" + "; ".join(outcomes))


def _has_entries(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    with os.scandir(folder) as entries:
        return next(entries, None) is not None


def _named(version: int | None) -> str:
    return f"v{version}" if version else "the untrained model"
