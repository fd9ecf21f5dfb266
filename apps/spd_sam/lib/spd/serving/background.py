"""Embeds the rest of a volume in the background, yielding to interactive requests."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

logger = logging.getLogger(__name__)


class BackgroundEmbedder:
    """A single worker thread that fills the embedding cache slice by slice.

    Jobs are keyed by cache key; submitting a key again moves it to the front. Work pauses while
    any request is inside :meth:`foreground`, so a click never waits behind background work for
    more than one chunk.

    Args:
        chunk: slices embedded per step.
    """

    def __init__(self, chunk: int = 1):
        self.chunk = chunk
        self._jobs: OrderedDict[str, tuple[Callable[[], Sequence[int]], Callable[[list[int]], None]]] = OrderedDict()
        self._busy = 0
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="spd-background-embed", daemon=True)
        self._thread.start()

    def submit(self, key: str, missing: Callable[[], Sequence[int]], embed: Callable[[list[int]], None]) -> None:
        """Queue a volume: ``missing()`` lists slices still to embed, ``embed(slices)`` embeds and caches them."""
        with self._lock:
            self._jobs[key] = (missing, embed)
            self._jobs.move_to_end(key, last=False)
            self._lock.notify_all()

    @contextmanager
    def foreground(self) -> Iterator[None]:
        """Marks an interactive request; background work waits until none is running."""
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                self._lock.notify_all()

    def pending(self) -> int:
        with self._lock:
            return len(self._jobs)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._jobs or self._busy:
                    self._lock.wait()
                key, (missing, embed) = next(iter(self._jobs.items()))
            try:
                todo = list(missing())
                if not todo:
                    with self._lock:
                        self._jobs.pop(key, None)
                    logger.info("background embedding of %s complete", key)
                    continue
                started = time.perf_counter()
                embed(todo[: self.chunk])
                logger.debug("background: %d slices of %s in %.2fs (%d left)", min(self.chunk, len(todo)), key,
                             time.perf_counter() - started, max(len(todo) - self.chunk, 0))
            except Exception:  # a failing job must not kill the worker
                logger.exception("background embedding of %s failed; dropped", key)
                with self._lock:
                    self._jobs.pop(key, None)
