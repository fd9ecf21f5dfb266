"""Shared fixtures: the sample studies and a real MONAI Label server started on a temp copy of them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import local_server  # noqa: E402

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
