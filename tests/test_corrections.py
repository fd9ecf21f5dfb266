"""Corrective clicks: the leak a negative click removes, what a positive one adds, sessions and their store (no
backbone: positive clicks are decoded by thresholding the image in the prompt's box)."""

from __future__ import annotations

import numpy as np

from lib.spd.method import Click
from lib.spd.method.corrections import leak_around, missed_around, uncontradicted
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


def test_a_negative_click_on_a_thin_leak_beside_a_thick_structure_leaves_the_structure():
    """No edge tells the leak from the structure and the only positive prompts lie on the far side: the structure's
    core (much deeper in its slices than the click) holds it, so the cut falls near the thin leak."""
    rows, cols = np.mgrid[:48, :48]
    truth = np.zeros((13, 48, 48), dtype=bool)
    truth[:] = (rows - 24) ** 2 + (cols - 24) ** 2 <= 100
    mask = truth.copy()
    mask[:, 16:33, 34:37] = True  # a leak 3 pixels thick along the structure's side
    image = np.full(mask.shape, 0.5, dtype=np.float32)
    defenders = np.array([(s, 24, 16) for s in range(13)])
    leak = leak_around(mask, image, (6, 24, 35), defenders, (1.0, 1.0, 1.0), reach=6)
    assert (leak & truth).sum() <= 0.02 * truth.sum(), "the structure stays"
    assert (leak & ~truth)[6].sum() >= 0.6 * (mask & ~truth)[6].sum(), "the leak goes on the clicked slice"
    old = leak_around(mask, image, (6, 24, 35), defenders, (1.0, 1.0, 1.0), reach=6, hold_core=False)
    assert (old & truth).sum() > 0.1 * truth.sum(), "prompts alone would have let the cut into the structure"


def test_a_negative_click_outside_the_mask_removes_nothing():
    image, mask, _ = leaking_tube()
    assert not leak_around(mask, image, (11, 5, 5), np.array([(11, 24, 20)]), (1.0, 1.0, 1.0), reach=6).any()


def test_a_piece_no_positive_prompt_holds_goes_as_a_whole():
    image, mask, _ = leaking_tube()
    mask[2:5, 40:44, 40:44] = True  # a stray blob, not connected to the tube
    leak = leak_around(mask, image, (3, 42, 42), np.array([(s, 24, 20) for s in range(24)]), (1.0, 1.0, 1.0), reach=4)
    assert leak.sum() == 3 * 16 and leak[2:5, 40:44, 40:44].all()


def threshold_in_box(image: np.ndarray):
    """A decoder for one slice: the bright pixels inside the prompt's box."""
    def decode(t, prompts):
        r0, c0, r1, c1 = (int(round(v)) for v in prompts.boxes[0])
        out = np.zeros(image.shape[1:], dtype=bool)
        out[r0:r1 + 1, c0:c1 + 1] = image[t, r0:r1 + 1, c0:c1 + 1] > 0.5
        return out
    return decode


def test_a_positive_click_past_the_end_extends_the_mask_by_the_reach_and_a_click_inside_acts_locally():
    image, _, truth = leaking_tube(leak=(0, 0))
    mask = truth.copy()
    mask[12:] = False  # the mask stops at slice 11
    added = missed_around(mask, image, (14, 24, 20), threshold_in_box(image), (1.0, 1.0), reach=6, dense=False)
    span = np.flatnonzero(added.any(axis=(1, 2)))
    assert span[0] == 12 and span[-1] == 20, "from the mask's end to the click and the whole reach past it"
    assert (added & ~truth).sum() == 0 and not (added & mask).any()
    notch = truth.copy()
    notch[:, 18:21, 14:26] = False  # the mask misses the top of the tube on every slice
    local = missed_around(notch, image, (10, 19, 20), threshold_in_box(image), (1.0, 1.0), reach=6, dense=False)
    assert np.flatnonzero(local.any(axis=(1, 2))).tolist() == list(range(7, 14)), "one gap (half the reach) each way"
    assert (local & ~truth).sum() == 0


def test_a_positive_click_where_the_structure_narrows_past_the_end_is_bridged_back_to_the_mask():
    image, _, truth = leaking_tube(leak=(0, 0))
    rows, cols = np.mgrid[:48, :48]
    for s in range(12, 24):  # past slice 11 the tube narrows to a point, as a caudate's tail does
        radius = 6 - 0.75 * (s - 11)
        truth[s] = (rows - 24) ** 2 + (cols - 20) ** 2 <= max(radius, 0) ** 2
        image[s] = np.where(truth[s], 0.8, 0.2)
    mask = truth.copy()
    mask[12:] = False
    added = missed_around(mask, image, (16, 24, 20), threshold_in_box(image), (1.0, 1.0), reach=6, dense=False)
    assert added[12:17].any(axis=(1, 2)).all(), "every slice between the mask's end and the click is filled"
    assert (added & ~truth).sum() == 0


def test_the_slices_the_walk_cannot_cross_between_the_mask_and_a_click_past_its_end_are_bridged():
    image, _, truth = leaking_tube(leak=(0, 0))
    image[12:15][:, truth[0]] = 0.6  # dimmer on the slices between: the walk stops at the intensity change
    mask = truth.copy()
    mask[12:] = False
    added = missed_around(mask, image, (15, 24, 20), threshold_in_box(image), (1.0, 1.0), reach=6, dense=False)
    assert added[12:15].any(axis=(1, 2)).all(), "the slices between are filled"
    assert (added & ~truth).sum() == 0 and not (added & mask).any()


def test_a_positive_click_the_decoder_leaves_out_is_still_answered():
    image, mask, _ = leaking_tube(leak=(0, 0))  # the decoder finds only the tube, already in the mask
    added = missed_around(mask, image, (5, 40, 40), threshold_in_box(image), (1.0, 1.0), reach=6, dense=False)
    assert added[5, 40, 40] and not (added & mask).any()


def test_a_trained_head_vetoes_what_it_rules_out_or_is_sure_of_but_not_the_click_itself():
    region = np.zeros((6, 20, 20), dtype=bool)
    region[1:5, 4:16, 4:16] = True  # what a click would add, or remove
    belief = np.zeros(region.shape, dtype=np.float32)
    belief[:, :, :10] = 0.9  # the head is sure of the left half and rules out the right half
    asked = []

    def head(slices):
        asked.append(slices)
        return belief[slices]

    click = (2, 10, 13)  # on the right half
    added = uncontradicted(region, click, True, head, (1.0, 1.0))
    assert asked == [[1, 2, 3, 4]], "only the slices the region touches are asked for"
    assert added[:, :, :10].sum() == region[:, :, :10].sum(), "what the head allows is added"
    rows, cols = np.mgrid[:20, :20]
    near_click = (rows - 10) ** 2 + (cols - 13) ** 2 <= 9  # click_mm (3) around it
    assert added[click] and np.array_equal(added[2, :, 10:], (near_click & region[2])[:, 10:]), "the click's own surroundings ..."
    assert not added[[0, 1, 3, 4, 5], :, 10:].any(), "... only"
    removed = uncontradicted(region, (2, 10, 6), False, head, (1.0, 1.0))
    assert removed[:, :, 10:].sum() == region[:, :, 10:].sum(), "what the head does not hold is removed"
    assert removed[:, :, :10].sum() == removed[2, :, :10].sum() > 0, "of the sure half, only around the click"
    assert uncontradicted(region, click, True, lambda slices: None, (1.0, 1.0)) is region, "no head: all of it"


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
