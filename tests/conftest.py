"""Shared fixtures: the sample studies and a real MONAI Label server started on a temp copy of them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import app_path  # noqa: F401  (first: the one path set-up, shared with the scripts: the app folder on sys.path)
import local_server
import pytest
from labelled_cohort import LABELS, FolderDatastore
from make_cohort import make_cohort, write_cohort

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_STUDIES = ROOT / "sample_studies"


@pytest.fixture(scope="session")
def sample_studies() -> Path:
    """The studies made by scripts/setup.sh (built here if missing)."""
    if not (SAMPLE_STUDIES / "colin27_t1.nii.gz").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_studies.py"), "--out", str(SAMPLE_STUDIES)],
                       check=True)
    return SAMPLE_STUDIES


@pytest.fixture(scope="module")
def server(tmp_path_factory, sample_studies) -> local_server.LocalServer:
    """One server per test module on a temp copy of the sample studies (stopped with the module, so its
    background embedding does not compete with later modules for the CPU)."""
    workdir = tmp_path_factory.mktemp("server")
    studies = workdir / "studies"
    shutil.copytree(sample_studies, studies)
    running = local_server.start(workdir, studies)
    yield running
    running.stop()
    print(f"\nserver log: {running.log}")


@pytest.fixture(scope="module")
def cohort_datastore(tmp_path_factory):
    """Two small synthetic volumes (Colin27 + AAL variations) with final labels, and their work folder."""
    work = tmp_path_factory.mktemp("trainer")
    subjects = make_cohort(2, seed=1, labels=list(LABELS), crop_margin_mm=(25, 25, 2), slice_mm=4.0)
    write_cohort(subjects, work / "images", label_dir=work / "labels")
    return FolderDatastore(work / "images", work / "labels", [s.name for s in subjects]), work


# Modules that are slow for reasons their fixture names do not show, with the reason.
SLOW_MODULES = {
    "test_backbones.py": "loads the real LiteMedSAM backbone (ONNX export and eager) and a random ViT-B",
    "test_dicomweb.py": "starts Orthanc and a MONAI Label server",
    "test_ohif.py": "starts Orthanc, a MONAI Label server and Chromium",
    "test_training_trainer.py": "runs training rounds on the real backbone, one under DDP",
    "test_training_lora.py": "runs a LoRA training round",
    "test_training_server.py": "trains through a MONAI Label server with an OIDC realm",
    "test_kill9.py": "SIGKILLs and restarts MONAI Label servers: label saves, background embedding, two training rounds",
}
# Single slow tests in otherwise fast modules (module::test function), with the reason.
SLOW_TESTS = {
    "test_fast_paths.py::test_gpu_benchmark_runs_in_cpu_mode": "runs scripts/bench_gpu.py on LiteMedSAM (~40 s)",
    "test_training_parts.py::test_decoding_with_gradients_matches_serving": "loads the real LiteMedSAM backbone",
    "test_size_prior.py::test_the_pipeline_uses_a_prior_only_for_its_label_and_axis": "loads the real backbone",
    "test_server.py::test_at_start_the_embeddings_of_gone_or_replaced_volumes_are_deleted": "starts two servers",
}
GPU_MODULES = {"test_cuda.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by what they need: `server` and `slow` for tests that use the `server` fixture (directly or
    through another fixture), `slow` for tests that use a `backbone` fixture or are listed in SLOW_MODULES or
    SLOW_TESTS, and `gpu` for the modules in GPU_MODULES (which skip themselves without CUDA).
    Fast tier: pytest -m "not slow"."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        module = item.path.name
        if "server" in fixtures:
            item.add_marker(pytest.mark.server)
            item.add_marker(pytest.mark.slow)
        if "backbone" in fixtures or module in SLOW_MODULES or f"{module}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if module in GPU_MODULES:
            item.add_marker(pytest.mark.gpu)
