"""Results computed ahead: one worker, waiting takers, no double work, bounded, failures dropped."""

from __future__ import annotations

import threading

from lib.infers.results_ahead import ResultsAhead


def test_a_taker_waits_for_the_running_computation_and_a_key_is_computed_once():
    release, calls = threading.Event(), []

    def compute():
        calls.append(1)
        release.wait(5)
        return "mask"

    ahead = ResultsAhead()
    assert ahead.submit("a", compute)
    assert not ahead.submit("a", compute), "queued twice"
    threading.Timer(0.2, release.set).start()
    assert ahead.take("a") == "mask" and ahead.take("a") == "mask"
    assert calls == [1]
    assert ahead.take("b") is None


def test_only_the_last_results_are_kept_and_a_failed_one_is_dropped():
    ahead = ResultsAhead(keep=2)
    for key in "abc":
        ahead.submit(key, lambda key=key: key.upper())
    assert [ahead.take(k) for k in "abc"] == [None, "B", "C"]

    def fail():
        raise RuntimeError("out of memory")

    ahead.submit("d", fail)
    assert ahead.take("d") is None
    assert ahead.submit("d", lambda: "D"), "a failed key can be queued again"
    assert ahead.take("d") == "D"
