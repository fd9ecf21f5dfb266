"""Start a private Orthanc PACS with the DICOMweb plugin on loopback and upload DICOM files to it.

As a module (tests, demos)::

    pacs = orthanc.start(Path("/tmp/pacs"))
    pacs.upload(sorted(Path("/tmp/series").glob("*.dcm")))
    ...  # monailabel start_server --studies pacs.dicomweb_url
    pacs.stop()

As a command (serves until Ctrl-C; uploads every NIfTI volume of a folder as a DICOM series)::

    python scripts/orthanc.py serve --dir /tmp/pacs --port 8042 --studies sample_studies

Orthanc and its DICOMweb plugin come from Debian (``orthanc``, ``orthanc-dicomweb``); they are
installed with apt-get when missing, which needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import requests

import app_path  # noqa: F401  (first: it puts the app folder and scripts/ on sys.path)

from local_server import free_port, wait_until_up
from nifti_to_dicom import nifti_to_dicom

PACKAGES = ("orthanc", "orthanc-dicomweb")
PLUGIN = "libOrthancDicomWeb.so"
DICOMWEB_ROOT = "/dicom-web/"


@dataclass
class OrthancServer:
    """A running Orthanc process and where it keeps its files."""

    url: str
    workdir: Path
    log: Path
    process: subprocess.Popen

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root to give ``monailabel start_server --studies``."""
        return self.url + DICOMWEB_ROOT.rstrip("/")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def upload(self, files: Iterable[Path]) -> list[dict]:
        """Store DICOM files with ``POST /instances``; return Orthanc's answer for each file.

        Raises:
            requests.HTTPError: Orthanc refused a file.
        """
        answers = []
        with requests.Session() as session:
            for file in files:
                response = session.post(f"{self.url}/instances", data=Path(file).read_bytes(), timeout=60)
                response.raise_for_status()
                answers.append(response.json())
        return answers

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def plugin_path() -> Path | None:
    """Where the installed ``orthanc-dicomweb`` package put the DICOMweb plugin, if it is installed."""
    listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True)
    paths = [Path(line) for line in listing.stdout.splitlines() if line.endswith("/" + PLUGIN)]
    return next((p for p in paths if p.is_file()), None)


def ensure_installed() -> Path:
    """Install Orthanc and its DICOMweb plugin with apt-get when missing; return the plugin's path.

    Raises:
        RuntimeError: they are missing and this process is not root, or apt-get failed.
    """
    plugin = plugin_path() if shutil.which("Orthanc") else None
    if plugin:
        return plugin
    if os.geteuid() != 0:
        raise RuntimeError(f"Orthanc is not installed; as root run: apt-get install -y {' '.join(PACKAGES)}")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{done.stderr[-2000:]}")
    plugin = plugin_path()
    if not (shutil.which("Orthanc") and plugin):
        raise RuntimeError(f"Orthanc or {PLUGIN} not found after installing {' '.join(PACKAGES)}")
    return plugin


def write_config(workdir: Path, port: int, plugin: Path) -> Path:
    """Write an Orthanc configuration that keeps everything in ``workdir`` and serves loopback clients only."""
    config = {
        "Name": "SPD-SAM PACS",
        "HttpPort": port,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT},
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start(workdir: Path, port: int | None = None, timeout_s: float = 60) -> OrthancServer:
    """Start Orthanc with its storage in ``workdir`` (installed first if missing); wait for its DICOMweb root.

    Raises:
        RuntimeError: Orthanc could not be installed, exited, or did not answer in time (with the log's tail).
    """
    plugin = ensure_installed()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = write_config(workdir, port, plugin)
    log = workdir / "orthanc.log"
    process = subprocess.Popen(["Orthanc", str(config)], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=workdir)
    server = OrthancServer(f"http://127.0.0.1:{port}", workdir, log, process)
    return wait_until_up(server, f"{server.dicomweb_url}/studies", "Orthanc", timeout_s)


def upload_studies(server: OrthancServer, studies: Path, dicom_dir: Path) -> dict[str, str]:
    """Convert every NIfTI volume directly in ``studies`` into a DICOM series and upload it.

    Returns:
        Volume name -> SeriesInstanceUID.
    """
    uploaded = {}
    for volume in sorted(studies.glob("*.nii*")):
        series = nifti_to_dicom(volume, dicom_dir / volume.name.split(".")[0])
        server.upload(series.files)
        uploaded[series.name] = series.series_uid
    return uploaded


def serve(args: argparse.Namespace) -> None:
    """Run Orthanc in the foreground until interrupted."""
    server = start(args.dir.resolve(), args.port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if args.studies:
            for name, uid in upload_studies(server, args.studies, args.dir.resolve() / "dicom").items():
                print(f"uploaded {name}: SeriesInstanceUID {uid}")
        print(f"Orthanc at {server.url}, DICOMweb at {server.dicomweb_url} (Ctrl-C stops it)", flush=True)
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="start Orthanc (and upload studies) until interrupted")
    run.add_argument("--dir", type=Path, required=True, help="work folder: configuration, storage, index, log")
    run.add_argument("--port", type=int, default=8042, help="HTTP port on 127.0.0.1 (default 8042)")
    run.add_argument("--studies", type=Path, help="folder of NIfTI volumes to upload as DICOM series")
    run.set_defaults(handler=serve)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
