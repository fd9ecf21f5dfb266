"""Per-slice embedding cache: an in-memory LRU under a byte budget, backed by files on disk.

Keys name a volume, a slice axis, a backbone and its weights, so a restart or a second user finds
the slices already embedded. Slices are stored as float16 (half the bytes; SAM decoders are
insensitive to it) and written atomically, one file per slice. A file that cannot be read, is not
float16 of three dimensions, or has another shape than the key's other slices (a damaged disk, a
copy cut short) is deleted and its slice embedded again, with a warning.

Freshly computed slices go to one writer thread, which copies them to the host (from a GPU, on a side
stream once the encoder's kernels are done) and writes their files, while the request goes on. Until
then they are pending: found, and served from the device they were computed on. Where the encoder outruns the
disk, a put waits while the pending slices take more than ``pending_budget_bytes`` (GPU memory, on a GPU).
:meth:`EmbeddingCache.flush` waits for the writes queued so far; at exit the writer finishes its queue.

With a disk budget, the least recently used files are deleted before each write until the files and the
one being written fit (its bytes are reserved while it is written), so the folder never holds more.
A file's mtime is its last use (set when written or read from disk), so the order survives restarts.
:meth:`EmbeddingCache.retain` deletes the slices of volumes that are gone (the app calls it at start).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Callable, Collection, Iterator, Sequence

import numpy as np
import torch

from ..atomic_files import replacing

logger = logging.getLogger(__name__)

_NPY_HEADER = 128  # bytes numpy's .npy format puts before the array


class EmbeddingCache:
    """Embeddings of slices, computed on demand.

    Args:
        budget_bytes: in-memory budget; least recently used slices are evicted beyond it.
        directory: where slices are persisted (None: memory only).
        disk_budget_bytes: budget of the persisted files (None or 0: unbounded).
        pending_budget_bytes: bytes of slices waiting for the writer beyond which a put waits for it.
    """

    def __init__(self, budget_bytes: int = 2 << 30, directory: str | os.PathLike | None = None,
                 disk_budget_bytes: int | None = None, pending_budget_bytes: int = 1 << 30):
        self.budget_bytes = int(budget_bytes)
        self.directory = Path(directory) if directory else None
        self.disk_budget_bytes = int(disk_budget_bytes or 0) or None
        self._memory: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._pending: dict[tuple[str, int], torch.Tensor] = {}  # queued for the writer, on their device
        self.pending_budget_bytes = int(pending_budget_bytes)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="embedding-cache-writer")
        self._bytes = 0
        self._lock = threading.RLock()
        self._stored = threading.Condition(self._lock)  # notified when the writer has taken slices off _pending
        self._disk: OrderedDict[tuple[str, int], int] = OrderedDict()  # file sizes, least recently used first
        self._disk_bytes = 0
        self._reserved = 0  # bytes of files being written
        self._pinned: Counter[tuple[str, int]] = Counter()  # slices that running requests will return
        self._warned = False
        if self.directory is not None and self.directory.is_dir():
            self._scan()

    @property
    def bytes_in_memory(self) -> int:
        return self._bytes

    def usage(self) -> dict[str, int | None]:
        """Bytes and files on disk, the disk budget (None: unbounded) and bytes in memory."""
        with self._lock:
            return {"disk_bytes": self._disk_bytes, "disk_budget_bytes": self.disk_budget_bytes,
                    "files": len(self._disk), "memory_bytes": self._bytes}

    def missing(self, key: str, slices: Sequence[int]) -> list[int]:
        """The slices of ``key`` that are neither pending, in memory nor on disk."""
        with self._lock:
            return [s for s in slices if (key, s) not in self._pending and (key, s) not in self._memory
                    and not self._file(key, s).is_file()]

    def flush(self) -> None:
        """Wait until the writes queued so far are done (from any thread but the writer's)."""
        self._writer.submit(lambda: None).result()  # one worker: it runs after them

    def retain(self, volume_ids: Collection[str]) -> int:
        """Delete the entries of every volume not in ``volume_ids`` (keys start with the volume id and a dash):
        a volume that is gone or was replaced can never be asked for again. Returns the slices deleted."""
        keep = set(volume_ids)
        self.flush()
        with self._lock:
            stale = [item for item in {*self._disk, *self._memory, *self._pending}
                     if item[0].split("-", 1)[0] not in keep and item not in self._pinned]
            for item in stale:
                self._forget(*item)
            self._remove_empty_folders({key for key, _ in stale})
        return len(stale)

    def get(self, key: str, slices: Sequence[int], compute: Callable[[list[int]], torch.Tensor],
            device: torch.device | str = "cpu") -> torch.Tensor:
        """Embeddings of ``slices`` stacked (N, C, h, w) as float16 on ``device``, computing the missing ones.

        Args:
            key: identifies volume, axis, backbone and weights.
            slices: slice indices to return, in order.
            compute: embeds a list of slice indices, returning (len, C, h, w) on any device.
            device: where the stack goes. Slices computed there stay there (the writer copies them to the host);
                cached slices on the host are copied there in one go.
        """
        with self._pinning(key, slices):
            todo = self.missing(key, slices)
            parts = self._embed(key, todo, compute, device) if todo else {}
            with self._lock:
                found = {s: self._load(key, s) for s in slices if s not in parts}
            parts.update(found)
            unreadable = [s for s, t in found.items() if t is None]
            self._embed_again(key, unreadable, compute, device, parts)
            # the shape of what was just embedded, else the most common one, is the key's shape
            shapes = [tuple(parts[s].shape) for s in (todo + unreadable or slices)]
            usual = max(set(shapes), key=shapes.count)
            self._embed_again(key, [s for s in found if tuple(parts[s].shape) != usual], compute, device, parts)
            hosted = [s for s in dict.fromkeys(slices) if parts[s].device.type == "cpu"]
            if hosted and torch.device(device).type != "cpu":  # in one copy
                parts.update(zip(hosted, torch.stack([parts[s] for s in hosted]).to(device)))
            return torch.stack([parts[s].to(device) for s in slices])  # pending ones may be on another device

    def put(self, key: str, slices: Sequence[int], embeddings: torch.Tensor) -> None:
        """Queue freshly computed embeddings for the writer, which copies them into memory and onto disk; until then
        they are pending, served from where they are."""
        embeddings = embeddings.detach().to(torch.float16)
        ready = torch.cuda.current_stream(embeddings.device).record_event() if embeddings.is_cuda else None
        rows = list(zip(slices, embeddings))
        with self._stored:  # wait while the writer is behind; never for an empty queue
            self._stored.wait_for(lambda: sum(t.nbytes for t in self._pending.values()) < self.pending_budget_bytes)
            self._pending.update(((key, s), row) for s, row in rows)
        try:
            self._writer.submit(self._store, key, rows, ready)
        except RuntimeError:  # the interpreter is exiting, the writer with it
            self._store(key, rows, ready)

    def _embed(self, key: str, slices: list[int], compute, device: torch.device | str) -> dict[int, torch.Tensor]:
        """Embed ``slices`` as float16 on ``device`` and put them in the cache."""
        computed = compute(slices).detach().to(device, torch.float16)
        self.put(key, slices, computed)
        return dict(zip(slices, computed))

    def _store(self, key: str, rows: list[tuple[int, torch.Tensor]], ready: torch.cuda.Event | None) -> None:
        """The writer's job: copy the (slice, embedding) rows to the host, remember them and write their files.
        From a GPU the copies run on a side stream once ``ready`` (recorded where the rows were made) is reached."""
        try:
            with self._pinning(key, [s for s, _ in rows]), self._copying(ready):
                for s, row in rows:
                    self._store_slice(key, s, row)
        except Exception:  # the writer goes on with the next job; these slices are embedded again when asked for
            logger.exception("embedding cache: could not store %d slice(s) of %s", len(rows), key)
        finally:
            with self._stored:
                for s, row in rows:
                    if self._pending.get((key, s)) is row:
                        del self._pending[(key, s)]
                self._stored.notify_all()

    @staticmethod
    def _copying(ready: torch.cuda.Event | None):
        """Where host copies run: from a GPU, on a side stream that first waits for ``ready``."""
        if ready is None:
            return nullcontext()
        stream = torch.cuda.Stream(ready.device)
        stream.wait_event(ready)
        return torch.cuda.stream(stream)

    def _store_slice(self, key: str, s: int, row: torch.Tensor) -> None:
        """Copy the pending slice to the host, then into memory and its file; nothing if it was forgotten."""
        item = (key, s)
        room = row.nbytes + _NPY_HEADER if self.directory is not None else 0
        with self._lock:
            if self._pending.get(item) is not row:  # forgotten since it was put
                return
            self._reserved += room
            self._evict()
        try:
            e = row.to("cpu", copy=True)  # its own memory, freed when it is evicted; from a GPU, waits for the copy
            size = self._write(key, s, e) if room else 0
        finally:
            with self._lock:
                self._reserved -= room
        with self._lock:
            if self._pending.get(item) is not row:  # forgotten while it was written
                if size:
                    self._file(key, s).unlink(missing_ok=True)
                return
            del self._pending[item]
            self._remember(item, e)
            if size:
                self._record(item, size)
                self._evict()

    @contextmanager
    def _pinning(self, key: str, slices: Sequence[int]) -> Iterator[None]:
        """Keep the files of ``slices`` from eviction while the block runs."""
        items = [(key, s) for s in slices]
        with self._lock:
            self._pinned.update(items)
        try:
            yield
        finally:
            with self._lock:
                for item in items:
                    self._pinned[item] -= 1
                    if not self._pinned[item]:
                        del self._pinned[item]

    def _embed_again(self, key: str, damaged: list[int], compute, device: torch.device | str,
                     found: dict[int, torch.Tensor]) -> None:
        """Replace the damaged slices' files and entries in ``found`` with fresh embeddings on ``device``."""
        if not damaged:
            return
        logger.warning("embedding cache: %d damaged file(s) under %s (slices %s); embedding them again",
                       len(damaged), self._file(key, damaged[0]).parent, damaged)
        with self._lock:
            for s in damaged:
                self._forget(key, s)
        found.update(self._embed(key, damaged, compute, device))

    def _load(self, key: str, s: int) -> torch.Tensor | None:
        """The slice's embedding, pending, from memory or from disk; None when its file is damaged."""
        if (key, s) in self._pending:
            return self._pending[(key, s)]
        if (key, s) in self._memory:
            self._memory.move_to_end((key, s))
            if (key, s) in self._disk:
                self._disk.move_to_end((key, s))
            return self._memory[(key, s)]
        path = self._file(key, s)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if array.dtype != np.float16 or array.ndim != 3:
            return None
        with suppress(OSError):  # the mtime records the use across restarts
            os.utime(path)
            self._record((key, s), path.stat().st_size)
        tensor = torch.from_numpy(array)
        self._remember((key, s), tensor)
        return tensor

    def _forget(self, key: str, s: int) -> None:
        """Drop the slice everywhere; a pending one is not written (or its file is deleted once written)."""
        self._pending.pop((key, s), None)
        if (key, s) in self._memory:
            self._bytes -= self._memory.pop((key, s)).nbytes
        self._disk_bytes -= self._disk.pop((key, s), 0)
        self._file(key, s).unlink(missing_ok=True)

    def _remember(self, item: tuple[str, int], tensor: torch.Tensor) -> None:
        if item in self._memory:
            self._bytes -= self._memory.pop(item).nbytes
        self._memory[item] = tensor
        self._bytes += tensor.nbytes
        while self._bytes > self.budget_bytes and len(self._memory) > 1:
            _, evicted = self._memory.popitem(last=False)
            self._bytes -= evicted.nbytes

    def _remove_empty_folders(self, keys: set[str]) -> None:
        """Remove the folders of ``keys`` that are empty, except those of running requests (about to write)."""
        if self.directory is None:
            return
        for key in keys - {key for key, _ in self._pinned}:
            with suppress(OSError):  # not empty
                (self.directory / key).rmdir()

    def _file(self, key: str, s: int) -> Path:
        if self.directory is None:
            return Path(os.devnull) / "absent"
        return self.directory / key / f"{s:05d}.npy"

    def _write(self, key: str, s: int, tensor: torch.Tensor) -> int:
        """Persist the slice; the file's size, 0 when it could not be written."""
        target = self._file(key, s)
        try:
            with replacing(target, fsync=False) as tmp, open(tmp, "wb") as handle:  # damaged files are re-made
                np.save(handle, tensor.numpy())
            return target.stat().st_size
        except OSError as error:  # a full disk costs the persistence, not the request
            logger.warning("could not persist embedding %s: %s", target, error)
            return 0

    def _scan(self) -> None:
        """Index the files already on disk, oldest use first, and enforce the disk budget on them."""
        found = []
        for path in self.directory.glob("*/*.npy"):
            with suppress(OSError, ValueError):
                stat = path.stat()
                found.append((stat.st_mtime_ns, (path.parent.name, int(path.stem)), stat.st_size))
        with self._lock:
            for _, item, size in sorted(found):
                self._record(item, size)
            self._evict()

    def _record(self, item: tuple[str, int], size: int) -> None:
        """Note a file on disk as the most recently used."""
        self._disk_bytes += size - self._disk.pop(item, 0)
        self._disk[item] = size

    def _evict(self) -> None:
        """Delete the least recently used files, except pinned ones, until they and the files being written fit
        the disk budget."""
        if not self.disk_budget_bytes or self._disk_bytes + self._reserved <= self.disk_budget_bytes:
            return
        excess, victims = self._disk_bytes + self._reserved - self.disk_budget_bytes, []
        for item, size in self._disk.items():
            if excess <= 0:
                break
            if item not in self._pinned:
                victims.append(item)
                excess -= size
        for item in victims:
            self._disk_bytes -= self._disk.pop(item)
            self._file(*item).unlink(missing_ok=True)
        self._remove_empty_folders({key for key, _ in victims})
        if excess > 0 and not self._warned:
            self._warned = True
            logger.warning("embedding cache: the slices of running requests take %d MB on disk, over the %d MB "
                           "disk budget; they are kept until the next write", self._disk_bytes >> 20,
                           self.disk_budget_bytes >> 20)
