"""A training round under torch DDP: one process per GPU (NCCL), or several CPU processes (gloo).

MONAI Label's request parameters choose the GPUs (``multi_gpu``, ``gpus``: "all" or "0,1");
without CUDA, ``cpu_processes`` asks for gloo processes on the CPU (mainly for testing the
distributed path; on a small CPU one process is faster). Each rank builds its own pipeline, loads
the published model, trains its share (``lib.spd.training.round`` under :class:`~lib.spd.training.distributed.Rank`);
rank 0 publishes and writes the trainer's answer for the parent.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from lib.request_flags import parse_flag
from lib.spd.method import SPDPipeline
from lib.spd.serving import CheckpointStore, ModelReloader
from lib.spd.training import LabelledVolume, Rank, TrainConfig, exit_rank, run_training
from lib.trainers.publishing import publish_round

logger = logging.getLogger(__name__)


class LaunchError(ValueError):
    """The requested devices or processes cannot be used; the message says why."""


@dataclass(frozen=True)
class Launch:
    """One device per rank and the process-group backend."""

    devices: tuple[str, ...]
    backend: str


def plan_launch(request: dict, serving_device: torch.device, cuda_count: int) -> Launch | None:
    """The ranks a request asks for, or None for a single process.

    Args:
        request: train request (``multi_gpu``, default true; ``gpus``, default "all"; ``cpu_processes``, default 1).
        serving_device: the device the backbone runs on (CUDA training needs CUDA serving).
        cuda_count: visible CUDA devices.

    Raises:
        LaunchError: a malformed ``multi_gpu``, ``gpus`` or ``cpu_processes``, or a GPU id that does not exist.
    """
    multi_gpu = parse_flag(request.get("multi_gpu", True), "multi_gpu", LaunchError)
    if serving_device.type == "cuda":
        if not multi_gpu or cuda_count < 2:
            return None
        gpus = str(request.get("gpus", "all") or "all").strip()
        try:
            ids = list(range(cuda_count)) if gpus == "all" else [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise LaunchError(f"gpus must be 'all' or comma-separated GPU ids, got {gpus!r}") from None
        if any(not 0 <= i < cuda_count for i in ids) or len(set(ids)) != len(ids):
            raise LaunchError(f"gpus {gpus!r}: ids must be distinct and within 0..{cuda_count - 1}")
        return Launch(tuple(f"cuda:{i}" for i in ids), "nccl") if len(ids) >= 2 else None
    value = request.get("cpu_processes", 1)
    try:
        processes = int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"cpu_processes must be an integer, got {value!r}") from None
    if not 1 <= processes <= max(os.cpu_count() or 1, 2):
        raise LaunchError(f"cpu_processes must be within [1, {max(os.cpu_count() or 1, 2)}], got {processes}")
    return Launch(("cpu",) * processes, "gloo") if processes >= 2 else None


@dataclass(frozen=True)
class Job:
    """Everything a rank needs (sent to spawned processes, so plain picklable data and a factory)."""

    launch: Launch
    factory: Callable[[str], SPDPipeline]  # device -> a pipeline like the server's
    store_dir: str
    train: list[LabelledVolume]
    val: list[LabelledVolume]
    labels: dict[str, int]
    axis: int
    config: TrainConfig
    elapsed_s: float  # seconds the round already spent before the launch
    log_level: int
    publish_always: bool = False


def run_distributed(job: Job) -> dict:
    """Train on every rank of ``job.launch``; returns rank 0's answer after publishing.

    Raises:
        RuntimeError: a rank failed (nothing is published unless rank 0 finished).
    """
    with tempfile.TemporaryDirectory(prefix="spd_ddp_") as work:
        logger.info("spd_sam training: %d DDP processes (%s) on %s", len(job.launch.devices), job.launch.backend,
                    ", ".join(job.launch.devices))
        torch.multiprocessing.spawn(_rank_main, args=(job, work), nprocs=len(job.launch.devices), join=True)
        answer = Path(work) / "answer.json"
        if not answer.is_file():
            raise RuntimeError("distributed training ended without an answer from rank 0")
        return json.loads(answer.read_text())


def _rank_main(rank: int, job: Job, work: str) -> None:
    world, device = len(job.launch.devices), job.launch.devices[rank]
    logging.basicConfig(level=job.log_level, format=f"[%(asctime)s] [rank {rank}] [%(levelname)s] (%(name)s) - %(message)s")
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        torch.cuda.set_device(device)
    dist.init_process_group(job.launch.backend, init_method=f"file://{work}/rendezvous", rank=rank, world_size=world)
    try:
        started = time.monotonic()
        pipeline = job.factory(device)
        store = CheckpointStore(job.store_dir)
        ModelReloader(store, pipeline).refresh()  # continue from the published model, as a single process does
        served = pipeline.state
        result = run_training(pipeline, job.train, job.val, job.labels, job.axis, job.config, ranks=Rank(rank, world))
        if rank == 0:
            seconds = job.elapsed_s + time.monotonic() - started
            answer = publish_round(store, pipeline, served, result, job.axis, job.config, seconds, world,
                                   job.publish_always)
            (Path(work) / "answer.json").write_text(json.dumps(answer))
    finally:
        dist.destroy_process_group()
    pipeline.cache.flush()  # the embeddings this rank made stay on disk: exit_rank drops the writer's queue
    exit_rank()  # only after the work returned: an exception above still reaches the launcher
