"""Corrective clicks: the leak a negative click removes, sessions and their store (no backbone)."""

from __future__ import annotations

import numpy as np

from lib.spd.method import Click
from lib.spd.method.corrections import leak_around
from lib.spd.method.interaction import Session, SessionStore


def leaking_tube(depth=24, leak=(9, 14)):
    """A bright tube along the slices and, on slices ``leak``, a darker blob touching it that the mask leaked into."""
    rows, cols = np.mgrid[:48, :48]
    tube = ((rows - 24) ** 2 + (cols - 20) ** 2 <= 36)
    blob = ((rows - 24) ** 2 + (cols - 31) ** 2 <= 25)
    image = np.full((depth, 48, 48), 0.2, dtype=np.float32)
    image[:, tube] = 0.8
    truth = np.zeros(image.shape, dtype=bool)
    truth[:, tube] = True
    mask = truth.copy()
    image[leak[0]:leak[1], blob & ~tube] = 0.55
    mask[leak[0]:leak[1], blob] = True
    return image, mask, truth


def test_a_negative_click_removes_the_leak_on_its_slice_and_where_it_continues_only():
    image, mask, truth = leaking_tube()
    defenders = np.array([(s, 24, 20) for s in range(24)])
    leak = leak_around(mask, image, (11, 24, 33), defenders, (1.0, 1.0, 1.0), reach=6)
    corrected = mask & ~leak
    leaked = mask & ~truth
    assert (leak & leaked).sum() >= 0.9 * leaked.sum(), "the leak goes on its slice and the adjacent ones"
    assert (leak & truth).sum() <= 0.05 * (truth[9:14]).sum(), "the structure stays"
    assert leak[9:14].any(axis=(1, 2)).all(), "every slice the leak continues on is corrected"
    np.testing.assert_array_equal(corrected[:9], mask[:9])
    np.testing.assert_array_equal(corrected[14:], mask[14:])


def test_a_negative_click_outside_the_mask_removes_nothing():
    image, mask, _ = leaking_tube()
    assert not leak_around(mask, image, (11, 5, 5), np.array([(11, 24, 20)]), (1.0, 1.0, 1.0), reach=6).any()


def test_a_piece_no_positive_prompt_holds_goes_as_a_whole():
    image, mask, _ = leaking_tube()
    mask[2:5, 40:44, 40:44] = True  # a stray blob, not connected to the tube
    leak = leak_around(mask, image, (3, 42, 42), np.array([(s, 24, 20) for s in range(24)]), (1.0, 1.0, 1.0), reach=4)
    assert leak.sum() == 3 * 16 and leak[2:5, 40:44, 40:44].all()


def session(clicks) -> Session:
    return Session(tuple(clicks), 2, None, None, None, np.zeros((1, 1, 1), bool), np.zeros((0, 3)), 3)


def test_new_clicks_are_what_a_request_adds_to_the_session_in_request_order():
    a, b, c, d = (Click((n, n, n), True) for n in range(4))
    neg = Click((9, 9, 9), False)
    s = session([a, b])
    assert s.new_clicks([a, b]) == []
    assert s.new_clicks([b, a, neg, c]) == [neg, c], "the viewer may resend its points in another order"
    assert s.new_clicks([a, c, d]) is None, "a click was taken away: not a correction"
    assert s.new_clicks([a, a, b]) == [a], "a click placed twice counts twice"


def test_the_store_drops_the_least_recently_used_and_the_idle():
    store = SessionStore(capacity=2, idle_s=3600)
    for key in "abc":
        store.put(key, session([]))
        if key == "b":
            store.get("a")  # a is used again: b is now the least recent
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    idle = SessionStore(capacity=4, idle_s=0.0)
    idle.put("a", session([]))
    assert idle.get("a") is None and len(idle) == 0
