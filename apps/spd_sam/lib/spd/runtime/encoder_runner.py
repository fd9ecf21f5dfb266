"""Runs a slice encoder over many slices: in chunks, overlapped with CPU pre-processing, on every device.

One encoder replica per device; the chunks of a request are dealt out to the devices in turn, and
on each device a loader thread reads and pins the next chunk (the voxels as stored: the device
windows them) while the current one is encoded. On CUDA the chunk size comes from a memory budget (the bytes one slice costs are
measured once per device), the encoder runs under bf16 autocast, and an out-of-memory error
halves the chunk and retries, down to one slice, then encodes that slice on the CPU.
"""

from __future__ import annotations

import copy
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16")
Reader = Callable[[list[int]], np.ndarray | torch.Tensor]  # slice indices -> (n, H, W) on the host, any dtype
Preprocess = Callable[[torch.Tensor], torch.Tensor]  # (n, H, W) as read, on the device -> (n, 3, S, S) model input


@dataclass
class EncoderSettings:
    """How :class:`EncoderRunner` batches and where it runs.

    Attributes:
        precision: "auto" (bf16 autocast on CUDA, float32 on the CPU), "float32" or "bfloat16".
        chunk: slices per encoder call; 0 sizes it from ``memory_budget_bytes`` on CUDA (4 on the CPU).
        max_chunk: upper bound of an automatic chunk.
        memory_budget_bytes: GPU bytes per device the encoder may use; 0 = 80 % of what is free at first use.
        compile: wrap each CUDA replica in ``torch.compile`` (opt-in: the first call compiles for minutes).
    """

    precision: str = "auto"
    chunk: int = 0
    max_chunk: int = 64
    memory_budget_bytes: int = 0
    compile: bool = False


class EncoderRunner:
    """Encodes slices with one replica of ``encoder`` per device.

    Args:
        encoder: the image encoder (a module on ``devices[0]``, or any callable on the CPU such as
            an ONNX Runtime session wrapper).
        devices: devices to spread chunks over; replicas are made for devices after the first.
        settings: chunking, precision and memory budget.
    """

    def __init__(self, encoder: Callable[[torch.Tensor], torch.Tensor], devices: Sequence[torch.device],
                 settings: EncoderSettings | None = None):
        self.settings = settings or EncoderSettings()
        if self.settings.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.settings.precision!r}, expected one of {', '.join(PRECISIONS)}")
        self.devices = [torch.device(d) for d in devices]
        self._chunks: dict[torch.device, int] = {}
        self._lock = threading.Lock()
        self._replicate(encoder)

    def _replicate(self, encoder: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.replicas = [encoder] + [copy.deepcopy(encoder).to(device) for device in self.devices[1:]]
        self._encoders = [torch.compile(module) if self.settings.compile and device.type == "cuda" else module
                          for device, module in zip(self.devices, self.replicas)]
        self._cpu_encoder: Callable | None = None

    def encoder_changed(self) -> None:
        """Copy the first replica's modules and weights again to the other devices (and to the CPU copy)."""
        with self._lock:
            self._replicate(self.replicas[0])

    def run(self, read: Reader, indices: Sequence[int], preprocess: Preprocess) -> torch.Tensor:
        """Embeddings (N, C, g, g) of slices ``indices`` on the first device, where a request decodes them: float32
        from the CPU, float16 from a GPU (the other GPUs' chunks copied there)."""
        indices = list(indices)
        if not indices:
            return torch.zeros(0)
        shares: list[list[list[int]]] = [[] for _ in self.devices]  # chunks per replica
        position = 0
        turn = 0
        while position < len(indices):
            worker = turn % len(self.devices)
            size = self.chunk_size(self.devices[worker], preprocess, read, indices[0])
            shares[worker].append(indices[position:position + size])
            position += size
            turn += 1
        work = [(worker, chunks) for worker, chunks in enumerate(shares) if chunks]
        if len(work) == 1:
            results = [self._run_on(*work[0], read, preprocess)]
        else:
            with ThreadPoolExecutor(len(work)) as pool:
                results = list(pool.map(lambda item: self._run_on(*item, read, preprocess), work))
        by_slice = {s: emb for outputs in results for s, emb in outputs}
        return torch.stack([by_slice[s] for s in indices])

    def chunk_size(self, device: torch.device, preprocess: Preprocess, read: Reader, sample: int) -> int:
        """Slices per call on ``device``: the setting, 4 on the CPU, else what the memory budget allows."""
        if self.settings.chunk > 0:
            return self.settings.chunk
        if device.type != "cuda":
            return 4
        with self._lock:
            if device not in self._chunks:
                replica = self.replicas[self.devices.index(device)]
                self._chunks[device] = self._measure_chunk(device, replica, preprocess(self._load(read, [sample],
                                                                                                  device).to(device)))
            return self._chunks[device]

    def _measure_chunk(self, device: torch.device, replica: Callable, one: torch.Tensor) -> int:
        """Encode one slice, read the peak memory it added and fit as many as the budget allows."""
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode(), self._autocast(device):
            replica(one)  # eager: measuring must not wait for a compilation
        per_slice = max(torch.cuda.max_memory_allocated(device) - before, 1)
        budget = self.settings.memory_budget_bytes or int(0.8 * torch.cuda.mem_get_info(device)[0])
        chunk = int(max(1, min(self.settings.max_chunk, budget // per_slice)))
        logger.info("encoder on %s: %.0f MiB per slice, budget %.0f MiB -> %d slices per chunk",
                    device, per_slice / 2**20, budget / 2**20, chunk)
        return chunk

    def _run_on(self, worker: int, chunks: list[list[int]], read: Reader, preprocess: Preprocess
                ) -> list[tuple[int, torch.Tensor]]:
        """Encode ``chunks`` with replica ``worker`` while a loader thread reads the next one."""
        device = self.devices[worker]
        outputs: list[tuple[int, torch.Tensor]] = []
        context = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
        with ThreadPoolExecutor(1) as loader, context, torch.inference_mode(), self._autocast(device):
            pending = loader.submit(self._load, read, chunks[0], device)
            for n, chunk in enumerate(chunks):
                batch = pending.result()
                if n + 1 < len(chunks):
                    pending = loader.submit(self._load, read, chunks[n + 1], device)
                embeddings = self._encode(worker, batch, preprocess)
                outputs.extend(zip(chunk, embeddings))
        return outputs

    def _load(self, read: Reader, chunk: list[int], device: torch.device) -> torch.Tensor:
        """Read a chunk and, for a GPU, pin it so that the copy can overlap."""
        batch = torch.as_tensor(read(chunk)).contiguous()
        return batch.pin_memory() if device.type == "cuda" else batch

    def _encode(self, worker: int, batch: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
        """Encoder output (:meth:`_output`) for a (n, H, W) host batch; on CUDA out of memory, halve and retry,
        and at one slice pre-process and encode on the CPU."""
        device = self.devices[worker]
        try:
            return self._output(self._encoders[worker](preprocess(batch.to(device, non_blocking=True))))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(batch) > 1:
                half = len(batch) // 2
                with self._lock:
                    self._chunks[device] = max(1, min(self._chunks.get(device, half), half))
                logger.warning("CUDA out of memory encoding %d slices on %s; retrying in chunks of %d",
                               len(batch), device, half)
                return torch.cat([self._encode(worker, part, preprocess) for part in (batch[:half], batch[half:])])
            logger.warning("CUDA out of memory encoding one slice on %s; encoding it on the CPU", device)
            with torch.autocast("cuda", enabled=False):
                return self._output(self._cpu(preprocess(batch.cpu())))

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """Encoder output on the first device: float16 where that is a GPU (the cache keeps float16), else float32."""
        first = self.devices[0]
        return out.to(first, torch.float16) if first.type == "cuda" else out.float()

    def _cpu(self, batch: torch.Tensor) -> torch.Tensor:
        """The encoder run on the CPU in float32 (a copy made on first use, tensor by tensor straight to
        host memory, since the GPU has none to spare)."""
        with self._lock:
            if self._cpu_encoder is None:
                on_host = {id(t): (nn.Parameter(t.detach().float().cpu(), requires_grad=False)
                                   if isinstance(t, nn.Parameter) else t.cpu())
                           for t in (*self.replicas[0].parameters(), *self.replicas[0].buffers())}
                self._cpu_encoder = copy.deepcopy(self.replicas[0], memo=on_host)
        return self._cpu_encoder(batch)

    def _autocast(self, device: torch.device):
        precision = self.settings.precision
        if precision == "auto":
            precision = "bfloat16" if device.type == "cuda" else "float32"
        if precision == "float32":
            return nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)
