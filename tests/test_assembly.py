"""3D assembly: trimming beyond the clicks and keeping prompted components, on tensors; checked against
scipy's labelling and the slice-by-slice walk they replace."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from lib.spd.method.assembly import keep_prompted_components, trim_unanchored_ends


def trim(masks, first, anchored, support=None):
    support = None if support is None else torch.tensor(support)
    return trim_unanchored_ends(torch.from_numpy(masks), first, anchored, support).numpy()


def keep(volume, seeds):
    return keep_prompted_components(torch.from_numpy(volume), torch.tensor(seeds)).numpy()


def test_trim_stops_where_the_structure_ends():
    masks = np.zeros((10, 20, 20), dtype=bool)
    masks[2:7, 5:10, 5:10] = True  # the structure, slices 2..6
    masks[8, 12:18, 12:18] = True  # something else beyond a gap
    out = trim(masks, first=100, anchored=(103, 105))
    assert out[2:7, 5:10, 5:10].all()
    assert not out[8].any(), "slices past an empty slice are dropped"


def test_trim_drops_a_jump_to_a_non_overlapping_region():
    masks = np.zeros((6, 20, 20), dtype=bool)
    masks[0:4, 2:6, 2:6] = True
    masks[4, 12:16, 12:16] = True  # no overlap with slice 3
    out = trim(masks, 0, anchored=(0, 3))
    assert out[:4].any(axis=(1, 2)).all() and not out[4:].any()


def test_trim_keeps_everything_between_anchors():
    masks = np.zeros((6, 10, 10), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[5, 7:9, 7:9] = True
    out = trim(masks, 0, anchored=(0, 5))
    assert (out == masks).all()


def test_trim_stops_where_support_fades():
    masks = np.zeros((8, 10, 10), dtype=bool)
    masks[:, 3:7, 3:7] = True  # the decoder keeps finding something in the carried box
    support = [0.1, 0.2, 0.9, 0.8, 0.9, 0.85, 0.3, 0.9]
    out = trim(masks, 0, anchored=(2, 4), support=support)
    assert out[2:6].any(axis=(1, 2)).all()
    assert not out[:2].any() and not out[6:].any(), "past a slice without support, nothing is kept"


def walk(masks, lo, hi, support, min_overlap=0.5, max_growth=1.3, min_support=0.5):
    """The slice-by-slice walk outwards from the anchored range, as the trim was first written."""
    out = masks.copy()
    floor = min_support * float(np.median(support[lo:hi + 1]))
    for start, stop, step in ((lo, -1, -1), (hi, len(masks), 1)):
        previous, ended = out[start], False
        for n in range(start + step, stop, step):
            area = out[n].sum()
            ended = ended or bool(area == 0 or np.logical_and(out[n], previous).sum() < min_overlap * area
                                  or area > max_growth * max(previous.sum(), 1) or support[n] < floor)
            if ended:
                out[n] = False
            else:
                previous = out[n]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_trim_equals_the_slice_by_slice_walk(seed):
    rng = np.random.default_rng(seed)
    radius = np.clip(6 + np.cumsum(rng.normal(0, 1.5, 24)), 0, 12)
    centre = 15 + np.cumsum(rng.normal(0, 2, (24, 2)), axis=0)
    rows, cols = np.mgrid[:32, :32]
    masks = np.stack([(rows - r) ** 2 + (c - cols) ** 2 < s ** 2 for (r, c), s in zip(centre, radius)])
    support = rng.uniform(0.2, 1.0, 24)
    lo, hi = sorted(rng.choice(np.arange(4, 20), 2, replace=False))
    assert (trim(masks, 7, (lo + 7, hi + 7), support) == walk(masks, lo, hi, support)).all()


@pytest.mark.parametrize("seed", range(4))
def test_kept_components_equal_scipys_labelling(seed):
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.standard_normal((20, 40, 40)), 2) > 0.05  # dozens of blobs
    seeds = rng.integers(0, [20, 40, 40], (6, 3))
    labels, _ = ndimage.label(volume, structure=np.ones((3, 3, 3)))
    hit = set(labels[tuple(seeds.T)].tolist()) - {0}
    assert hit, "some seed lands in a blob"
    assert (keep(volume, seeds) == np.isin(labels, list(hit))).all()


def test_keeps_components_that_hold_a_prompt():
    vol = np.zeros((10, 10, 10), dtype=bool)
    vol[1:3, 1:3, 1:3] = True
    vol[6:9, 6:9, 6:9] = True
    out = keep(vol, [(7, 7, 7)])
    assert out[7, 7, 7] and not out[1, 1, 1]


def test_components_touching_at_a_corner_are_one():
    vol = np.zeros((6, 6, 6), dtype=bool)
    vol[0:2, 0:2, 0:2] = True
    vol[2:4, 2:4, 2:4] = True  # shares only the corner (1, 1, 1)-(2, 2, 2)
    assert keep(vol, [(0, 0, 0)])[3, 3, 3]


def test_prompt_outside_every_component_keeps_the_nearest():
    vol = np.zeros((10, 10, 10), dtype=bool)
    vol[0:2, 0:2, 0:2] = True
    vol[7:9, 7:9, 7:9] = True
    out = keep(vol, [(6, 6, 6)])
    assert out[8, 8, 8] and not out[0, 0, 0]
