"""Per-slice embedding cache: an in-memory LRU under a byte budget, backed by files on disk.

Keys name a volume, a slice axis, a backbone and its weights, so a restart or a second user finds
the slices already embedded. Slices are stored as float16 (half the bytes; SAM decoders are
insensitive to it) and written atomically, one file per slice. A file that cannot be read, is not
float16 of three dimensions, or has another shape than the key's other slices (a damaged disk, a
copy cut short) is deleted and its slice embedded again, with a warning.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .atomic_files import replacing

logger = logging.getLogger(__name__)


class EmbeddingCache:
    """Embeddings of slices, computed on demand.

    Args:
        budget_bytes: in-memory budget; least recently used slices are evicted beyond it.
        directory: where slices are persisted (None: memory only).
    """

    def __init__(self, budget_bytes: int = 2 << 30, directory: str | os.PathLike | None = None):
        self.budget_bytes = int(budget_bytes)
        self.directory = Path(directory) if directory else None
        self._memory: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()

    @property
    def bytes_in_memory(self) -> int:
        return self._bytes

    def missing(self, key: str, slices: Sequence[int]) -> list[int]:
        """The slices of ``key`` that are neither in memory nor on disk."""
        with self._lock:
            return [s for s in slices if (key, s) not in self._memory and not self._file(key, s).is_file()]

    def get(self, key: str, slices: Sequence[int], compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """Embeddings of ``slices`` stacked (N, C, h, w) as float16, computing the missing ones.

        Args:
            key: identifies volume, axis, backbone and weights.
            slices: slice indices to return, in order.
            compute: embeds a list of slice indices, returning (len, C, h, w).
        """
        todo = self.missing(key, slices)
        if todo:
            self.put(key, todo, compute(todo))
        with self._lock:
            found = {s: self._load(key, s) for s in slices}
        unreadable = [s for s, t in found.items() if t is None]
        self._embed_again(key, unreadable, compute, found)
        # the shape of what was just embedded, else the most common one, is the key's shape
        shapes = [tuple(found[s].shape) for s in (todo + unreadable or slices)]
        usual = max(set(shapes), key=shapes.count)
        self._embed_again(key, [s for s, t in found.items() if tuple(t.shape) != usual], compute, found)
        return torch.stack([found[s] for s in slices])

    def put(self, key: str, slices: Sequence[int], embeddings: torch.Tensor) -> None:
        """Store freshly computed embeddings in memory and on disk."""
        for s, e in zip(slices, embeddings):
            e = e.detach().to("cpu", torch.float16).contiguous()
            if self.directory is not None:
                self._write(key, s, e)
            with self._lock:
                self._remember((key, s), e)

    def _embed_again(self, key: str, damaged: list[int], compute, found: dict[int, torch.Tensor]) -> None:
        """Replace the damaged slices' files and entries in ``found`` with fresh embeddings."""
        if not damaged:
            return
        logger.warning("embedding cache: %d damaged file(s) under %s (slices %s); embedding them again",
                       len(damaged), self._file(key, damaged[0]).parent, damaged)
        with self._lock:
            for s in damaged:
                self._forget(key, s)
        self.put(key, damaged, compute(damaged))
        with self._lock:
            found.update({s: self._load(key, s) for s in damaged})

    def _load(self, key: str, s: int) -> torch.Tensor | None:
        """The slice's embedding from memory or disk; None when its file is damaged."""
        if (key, s) in self._memory:
            self._memory.move_to_end((key, s))
            return self._memory[(key, s)]
        try:
            array = np.load(self._file(key, s), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if array.dtype != np.float16 or array.ndim != 3:
            return None
        tensor = torch.from_numpy(array)
        self._remember((key, s), tensor)
        return tensor

    def _forget(self, key: str, s: int) -> None:
        if (key, s) in self._memory:
            self._bytes -= self._memory.pop((key, s)).nbytes
        self._file(key, s).unlink(missing_ok=True)

    def _remember(self, item: tuple[str, int], tensor: torch.Tensor) -> None:
        if item in self._memory:
            self._bytes -= self._memory.pop(item).nbytes
        self._memory[item] = tensor
        self._bytes += tensor.nbytes
        while self._bytes > self.budget_bytes and len(self._memory) > 1:
            _, evicted = self._memory.popitem(last=False)
            self._bytes -= evicted.nbytes

    def _file(self, key: str, s: int) -> Path:
        if self.directory is None:
            return Path(os.devnull) / "absent"
        return self.directory / key / f"{s:05d}.npy"

    def _write(self, key: str, s: int, tensor: torch.Tensor) -> None:
        target = self._file(key, s)
        try:
            with replacing(target, fsync=False) as tmp, open(tmp, "wb") as handle:  # damaged files are re-made
                np.save(handle, tensor.numpy())
        except OSError as error:  # a full disk costs the persistence, not the request
            logger.warning("could not persist embedding %s: %s", target, error)
