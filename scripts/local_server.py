"""Start and stop a real ``monailabel start_server`` for the SPD-SAM app (tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "spd_sam"


@dataclass
class LocalServer:
    """A running server process and where it keeps its files."""

    url: str
    studies: Path
    log: Path
    process: subprocess.Popen
    own_group: bool = False  # started in a session of its own: stop() and kill() reach its subprocesses too
    killed: bool = False  # by kill()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.killed:
            return  # its group is gone with it, and the group id may belong to another process by now
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.own_group:  # training or scoring subprocesses the server left behind
            self._kill_group()

    def kill(self) -> None:
        """SIGKILL the server (and, in its own session, every process of the group), as a crash would; waits."""
        if self.own_group:
            self._kill_group()
        else:
            self.process.kill()
        self.process.wait()
        self.killed = True

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir: Path, studies: Path | str, conf: dict[str, str] | None = None, timeout_s: float = 300,
          env: dict[str, str] | None = None, probe: str = "/info/", own_group: bool = False,
          log_name: str = "server.log") -> LocalServer:
    """Start the app on ``studies`` with every MONAI Label path, its temp folder and trained checkpoints inside
    ``workdir``; wait for ``probe`` to answer (``/auth/`` when authentication is on: ``/info/`` then needs a token).
    Requests get full results, never a draft, unless ``conf`` sets ``draft`` (tests and benchmarks compare
    results; the app's default drafts on a CPU). ``own_group``: start it in a session of its own (see :meth:`LocalServer.kill`); ``log_name``: the log
    file in ``workdir`` (another name per restart keeps the earlier logs).

    Raises:
        RuntimeError: the server exited or did not answer in time (with the log's tail).
    """
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = dict(os.environ)
    full_env.update({
        "MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"),
        "MONAI_LABEL_DATASTORE_CACHE_PATH": str(workdir / "cache"),
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(workdir / "cache"),
        "TMPDIR": str(workdir / "tmp"),  # the server's temp files (results, logging configs) go with its workdir
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}",
        **(env or {}),
    })
    args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
            "--host", "127.0.0.1", "--port", str(port)]
    for key, value in {"trained_dir": str(workdir / "trained"), "draft": "false", **(conf or {})}.items():
        args += ["--conf", key, value]
    log = workdir / log_name
    process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=full_env, cwd=workdir,
                               start_new_session=own_group)
    server = LocalServer(f"http://127.0.0.1:{port}", Path(studies), log, process, own_group)
    return wait_until_up(server, f"{server.url}{probe}", "MONAI Label server", timeout_s)


def wait_until_up(server, probe_url: str, name: str, timeout_s: float, poll_s: float = 0.5):
    """Return ``server`` once ``probe_url`` answers 200; stop it and raise if it exits or times out.

    Args:
        server: has ``process``, ``log_tail()`` and ``stop()``.
        probe_url: a URL that answers 200 when the server is ready.
        name: used in error messages.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(probe_url, timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(poll_s)
    server.stop()
    raise RuntimeError(f"{name} did not answer {probe_url} within {timeout_s:.0f}s:\n{server.log_tail()}")
