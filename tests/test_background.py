"""Background embedding fills the cache and yields to interactive requests."""

import threading
import time

from lib.spd.serving import BackgroundEmbedder


class Store:
    def __init__(self, n):
        self.todo = set(range(n))
        self.done_during_foreground = 0
        self.in_foreground = threading.Event()
        self.lock = threading.Lock()

    def missing(self):
        with self.lock:
            return sorted(self.todo)

    def embed(self, slices):
        time.sleep(0.01)
        with self.lock:
            if self.in_foreground.is_set():
                self.done_during_foreground += 1
            self.todo -= set(slices)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_embeds_every_missing_slice():
    worker = BackgroundEmbedder(chunk=3)
    store = Store(20)
    worker.submit("vol", store.missing, store.embed)
    assert wait_until(lambda: not store.todo and worker.pending() == 0)


def test_pauses_while_a_request_runs():
    worker = BackgroundEmbedder(chunk=1)
    store = Store(50)
    with worker.foreground():
        store.in_foreground.set()
        worker.submit("vol", store.missing, store.embed)
        time.sleep(0.3)
        assert len(store.todo) == 50, "nothing is embedded while a request is in the foreground"
        store.in_foreground.clear()
    assert wait_until(lambda: not store.todo)


def test_a_failing_job_is_dropped_and_the_worker_goes_on():
    worker = BackgroundEmbedder()

    def broken(_):
        raise RuntimeError("boom")

    worker.submit("bad", lambda: [1, 2], broken)
    store = Store(5)
    worker.submit("good", store.missing, store.embed)
    assert wait_until(lambda: not store.todo and worker.pending() == 0)
