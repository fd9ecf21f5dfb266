"""Soak test: concurrent clients mixing infers on different images, label saves and a training run.

    .venv/bin/python scripts/soak.py                    # own server on a temp copy of the sample studies
    .venv/bin/python scripts/soak.py --clients 8 --requests 50 --cache-mb 1024
    .venv/bin/python scripts/soak.py --cache-disk-mb 200     # more embeddings than the disk budget holds

Every client (a ``MONAILabelClient``, as Slicer uses) sends ``--requests`` requests: infers with
rough clicks, one of them moved afresh each time as an annotator's re-click, on a structure of one
of the images (Colin27's right
caudate and left putamen from the AAL labels, a short centre line in the other volumes), and every
``--save-every``-th request a label save (the last result, tag ``soak``). One client starts a
training round. Each image's clicked region is embedded once before the clock starts (that first
request is reported on its own). It prints, per kind of request, the count, the errors and the
p50/p95 latency, and the server's resident memory against its embedding-cache budget. With
``--cache-disk-mb`` it also samples the embedding cache's folder twice a second and prints its peak
against that disk budget and how much it wrote in all; it fails if the folder ever held more.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import psutil
import requests
from monailabel.client import MONAILabelClient

from app_path import ROOT  # first: it puts the app folder and scripts/ on sys.path

import local_server
from lib.spd.training import ClickStyle, simulate_clicks

LABELS = json.loads((ROOT / "apps" / "spd_sam" / "labels.json").read_text())


@dataclass
class Target:
    """Clicks along one structure of one image."""

    image: str
    label: str | None
    clicks: list[list[int]]


@dataclass
class Report:
    """Latencies (s) and errors per kind of request, and the server's memory."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    first_requests: dict[str, float] = field(default_factory=dict)
    rss_start: int = 0
    rss_peak: int = 0
    disk_budget: int = 0
    disk_peak: int = 0
    disk_samples: int = 0
    disk_written: int = 0

    def add(self, kind: str, seconds: float) -> None:
        self.latencies.setdefault(kind, []).append(seconds)

    def lines(self) -> list[str]:
        firsts = ", ".join(f"{k} {v:.1f} s" for k, v in self.first_requests.items())
        out = [f"first request per target (embedding): {firsts}"]
        for kind, values in sorted(self.latencies.items()):
            p50, p95 = np.percentile(values, [50, 95])
            out.append(f"{kind:6s} n={len(values):4d}  p50 {p50:6.2f} s  p95 {p95:6.2f} s  max {max(values):6.2f} s")
        out.append(f"errors: {len(self.errors)}" + "".join(f"\n  {e}" for e in self.errors[:10]))
        if self.rss_start:
            out.append(f"server memory: {self.rss_start / 2**20:.0f} MiB before the requests, peak "
                       f"{self.rss_peak / 2**20:.0f} MiB (+{(self.rss_peak - self.rss_start) / 2**20:.0f} MiB)")
        if self.disk_budget:
            out.append(f"embedding cache on disk: peak {self.disk_peak / 2**20:.1f} MiB of a {self.disk_budget / 2**20:.0f} "
                       f"MiB budget over {self.disk_samples} samples; {self.disk_written / 2**20:.0f} MiB of files "
                       f"written in all ({self.disk_written / self.disk_budget:.1f} x the budget)")
        return out

    def over_disk_budget(self) -> bool:
        return bool(self.disk_budget) and self.disk_peak > self.disk_budget


def sample_targets(studies: Path) -> list[Target]:
    """Rough clicks on two Colin27 structures and a centre line in each other sample volume."""
    atlas = np.asarray(nib.load(studies / "labels" / "final" / "colin27_t1.nii.gz").dataobj)
    targets = []
    for name in ("right_caudate", "left_putamen"):
        clicks, _ = simulate_clicks(atlas == LABELS[name], (1, 1, 1), axis=2,
                                    style=ClickStyle(every=4, drift_mm=2.0, off_target=0.0),
                                    rng=np.random.default_rng(len(targets)))
        targets.append(Target("colin27_t1", name, clicks))
    for path in sorted(studies.glob("*.nii.gz")):
        image = path.name[: -len(".nii.gz")]
        if image == "colin27_t1":
            continue
        shape = nib.load(path).shape
        i, j, k = (s // 2 for s in shape)
        targets.append(Target(image, None, [[i, j, k + dk] for dk in range(-6, 7, 3)]))
    return targets


def one_click_moved(clicks: list[list[int]], rng: np.random.Generator) -> list[list[int]]:
    """The clicks with one of them moved by up to 2 voxels in-plane: an annotator's re-click."""
    moved = [list(c) for c in clicks]
    n = int(rng.integers(len(moved)))
    moved[n] = [moved[n][0] + int(rng.integers(-2, 3)), moved[n][1] + int(rng.integers(-2, 3)), moved[n][2]]
    return moved


def infer_params(target: Target, clicks: list[list[int]]) -> dict:
    params = {"foreground": clicks, "background": []}
    if target.label:
        params["label"] = target.label
    return params


class PeakWatch(threading.Thread):
    """Samples ``measure()`` (bytes) until stopped; keeps the first value, the peak and the count of samples."""

    def __init__(self, measure: Callable[[], int], period_s: float = 0.5):
        super().__init__(daemon=True)
        self.measure = measure
        self.period_s = period_s
        self.start_value = self.peak = measure()
        self.samples = 1
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.period_s):
            self.peak = max(self.peak, self.measure())
            self.samples += 1

    def stop(self) -> None:
        self.halt.set()
        self.join()


class FolderBytes:
    """Bytes of the files under a folder now, and of every file it has held (each file once: what was written)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.seen: dict[str, int] = {}

    def __call__(self) -> int:
        total = 0
        for path in self.folder.rglob("*"):
            try:
                size = path.stat().st_size if path.is_file() else 0
            except OSError:  # deleted meanwhile
                continue
            total += size
            self.seen[str(path)] = size
        return total


def run_soak(url: str, targets: list[Target], clients: int, requests_each: int, save_every: int, workdir: Path,
             train: dict | None, server_pid: int | None = None, seed: int = 0,
             cache_dir: Path | None = None, disk_budget: int = 0) -> Report:
    """Warm each target up, then run the clients; returns what happened. With ``cache_dir`` and ``disk_budget``,
    the embedding cache's folder is sampled from the first request on."""
    report = Report()
    disk = None
    if cache_dir is not None and disk_budget:
        cache_dir.mkdir(parents=True, exist_ok=True)
        folder = FolderBytes(cache_dir)
        disk = PeakWatch(folder)
        disk.start()
    warm = MONAILabelClient(url, tmpdir=str(workdir / "warm"))
    for target in targets:
        tic = time.perf_counter()
        warm.infer("spd_sam", target.image, infer_params(target, target.clicks))
        report.first_requests[f"{target.image}/{target.label or 'centre'}"] = time.perf_counter() - tic
    watch = PeakWatch(lambda: psutil.Process(server_pid).memory_info().rss) if server_pid else None
    if watch:
        report.rss_start = watch.start_value
        watch.start()
    lock = threading.Lock()

    def client_loop(n: int) -> None:
        rng = np.random.default_rng(seed + n)
        tmpdir = workdir / f"client{n}"
        tmpdir.mkdir(parents=True, exist_ok=True)
        client = MONAILabelClient(url, tmpdir=str(tmpdir))
        last: tuple[str, Path] | None = None
        for r in range(requests_each):
            target = targets[(n + r) % len(targets)]
            kind = "save" if save_every and r % save_every == save_every - 1 and last else "infer"
            if n == 0 and r == 1 and train is not None:
                kind = "train"
            tic = time.perf_counter()
            try:
                if kind == "infer":
                    result_file, _ = client.infer("spd_sam", target.image,
                                                  infer_params(target, one_click_moved(target.clicks, rng)))
                    kept = tmpdir / f"last_{r}.nii.gz"
                    shutil.move(result_file, kept)
                    last = (target.image, kept)
                elif kind == "save":
                    with open(last[1], "rb") as handle:
                        response = requests.put(f"{url}/datastore/label", params={"image": last[0], "tag": "soak"},
                                                files={"label": ("label.nii.gz", handle)}, data={"params": "{}"},
                                                timeout=300)
                    response.raise_for_status()
                else:
                    response = requests.post(f"{url}/train/spd_sam", json=train, timeout=60)
                    response.raise_for_status()
            except Exception as exc:  # every failure is counted and shown, whatever its kind
                with lock:
                    report.errors.append(f"client {n} request {r} ({kind}): {type(exc).__name__}: {exc}"[:400])
            with lock:
                report.add(kind, time.perf_counter() - tic)

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if watch:
        watch.stop()
        report.rss_peak = watch.peak
    if disk:
        disk.stop()
        report.disk_budget, report.disk_peak, report.disk_samples = disk_budget, disk.peak, disk.samples
        report.disk_written = sum(folder.seen.values())
    return report


def wait_for_training(url: str, timeout_s: float) -> str:
    """The final status of the training task (it is stopped when it outlasts ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/train/", params={"check_if_running": "false"}, timeout=30).json()
        if status.get("status") not in ("RUNNING", "QUEUED"):
            return str(status.get("status"))
        time.sleep(5)
    requests.delete(f"{url}/train/", timeout=60)
    return "STOPPED after the soak"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one on a temp copy of the sample studies)")
    parser.add_argument("--studies", type=Path, default=ROOT / "sample_studies")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--save-every", type=int, default=5, help="every n-th request of a client is a label save")
    parser.add_argument("--cache-mb", type=int, default=1024, help="embedding cache budget of the started server")
    parser.add_argument("--cache-disk-mb", type=int, default=0,
                        help="disk budget of the started server's embedding cache, watched (0: the app's default, "
                             "not watched)")
    parser.add_argument("--train-minutes", type=float, default=3.0, help="max_minutes of the training round (0: none)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="spd_soak_"))
    server = None
    try:
        cache_dir = workdir / "embeddings"
        if args.url:
            if args.cache_disk_mb:
                parser.error("--cache-disk-mb watches the server this script starts; leave out --url")
            url, pid = args.url, None
        else:
            studies = workdir / "studies"
            shutil.copytree(args.studies, studies)
            conf = {"embedding_cache_mb": str(args.cache_mb)}
            if args.cache_disk_mb:
                conf.update(embedding_cache_disk_mb=str(args.cache_disk_mb), embedding_cache_dir=str(cache_dir))
            server = local_server.start(workdir / "server", studies, conf=conf)
            url, pid = server.url, server.process.pid
        train = {"max_minutes": args.train_minutes} if args.train_minutes > 0 else None
        tic = time.perf_counter()
        report = run_soak(url, sample_targets(args.studies), args.clients, args.requests, args.save_every,
                          workdir / "clients", train, pid, cache_dir=cache_dir, disk_budget=args.cache_disk_mb << 20)
        print(f"# soak: {args.clients} clients x {args.requests} requests on {url} in "
              f"{time.perf_counter() - tic:.0f} s (cache budget {args.cache_mb} MiB)")
        print("\n".join(report.lines()))
        if train is not None:
            print(f"training: {wait_for_training(url, timeout_s=60 * args.train_minutes + 300)}")
        alive = requests.get(f"{url}/info/", timeout=30).status_code == 200
        print(f"server answering /info/ afterwards: {alive}")
        sys.exit(1 if report.errors or not alive or report.over_disk_budget() else 0)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
