"""Results computed before they are asked for (the proposed next sample's auto segmentation), on one worker thread."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Hashable, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ResultsAhead(Generic[T]):
    """Computes results in the background, one at a time, and keeps the last ``keep`` of them.

    A request that finds its result still being computed waits for it instead of computing it twice.
    """

    def __init__(self, keep: int = 2, name: str = "spd-ahead"):
        self.keep = keep
        self._futures: OrderedDict[Hashable, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, key: Hashable, compute: Callable[[], T]) -> bool:
        """Queue ``compute`` under ``key``; False when that key is already queued, running or done."""
        with self._lock:
            if key in self._futures:
                self._futures.move_to_end(key)
                return False
            self._futures[key] = self._worker.submit(compute)
            while len(self._futures) > self.keep:
                self._futures.popitem(last=False)  # a running computation finishes; its result is dropped
        return True

    def take(self, key: Hashable) -> T | None:
        """The result under ``key`` (waiting while it is computed); None when there is none or it failed."""
        with self._lock:
            future = self._futures.get(key)
        if future is None:
            return None
        try:
            return future.result()
        except Exception:  # the request computes it itself, and reports its own error
            logger.exception("result computed ahead for %s failed; dropped", key)
            with self._lock:
                if self._futures.get(key) is future:
                    del self._futures[key]
            return None
