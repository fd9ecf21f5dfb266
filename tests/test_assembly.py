"""3D assembly: trimming beyond the clicks and keeping prompted components."""

import numpy as np

from lib.spd.method.assembly import keep_prompted_components, trim_unanchored_ends


def test_trim_stops_where_the_structure_ends():
    masks = np.zeros((10, 20, 20), dtype=bool)
    masks[2:7, 5:10, 5:10] = True  # the structure, slices 2..6
    masks[8, 12:18, 12:18] = True  # something else beyond a gap
    out = trim_unanchored_ends(masks, first_slice=100, anchored=(103, 105))
    assert out[2:7, 5:10, 5:10].all()
    assert not out[8].any(), "slices past an empty slice are dropped"


def test_trim_drops_a_jump_to_a_non_overlapping_region():
    masks = np.zeros((6, 20, 20), dtype=bool)
    masks[0:4, 2:6, 2:6] = True
    masks[4, 12:16, 12:16] = True  # no overlap with slice 3
    out = trim_unanchored_ends(masks, 0, anchored=(0, 3))
    assert out[:4].any(axis=(1, 2)).all() and not out[4:].any()


def test_trim_keeps_everything_between_anchors():
    masks = np.zeros((6, 10, 10), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[5, 7:9, 7:9] = True
    out = trim_unanchored_ends(masks, 0, anchored=(0, 5))
    assert (out == masks).all()


def test_keeps_components_that_hold_a_prompt():
    vol = np.zeros((10, 10, 10), dtype=bool)
    vol[1:3, 1:3, 1:3] = True
    vol[6:9, 6:9, 6:9] = True
    out = keep_prompted_components(vol, [(7, 7, 7)])
    assert out[7, 7, 7] and not out[1, 1, 1]


def test_prompt_outside_every_component_keeps_the_nearest():
    vol = np.zeros((10, 10, 10), dtype=bool)
    vol[0:2, 0:2, 0:2] = True
    vol[7:9, 7:9, 7:9] = True
    out = keep_prompted_components(vol, [(6, 6, 6)])
    assert out[8, 8, 8] and not out[0, 0, 0]


def test_trim_stops_where_support_fades():
    masks = np.zeros((8, 10, 10), dtype=bool)
    masks[:, 3:7, 3:7] = True  # the decoder keeps finding something in the carried box
    support = np.array([0.1, 0.2, 0.9, 0.8, 0.9, 0.85, 0.3, 0.9])
    out = trim_unanchored_ends(masks, 0, anchored=(2, 4), support=support)
    assert out[2:6].any(axis=(1, 2)).all()
    assert not out[:2].any() and not out[6:].any(), "past a slice without support, nothing is kept"
