"""The draft's fill between clicked slices (``draft.fill_between``)."""

from __future__ import annotations

import numpy as np

from lib.spd.method.draft import fill_between


def disc(radius: float, centre=(20, 20), shape=(40, 40)) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_the_shape_between_two_slices_blends_their_size():
    masks = np.stack([disc(4), disc(10)])
    filled = fill_between(masks, [3, 7], (1.0, 1.0))
    assert filled.shape == (5, 40, 40)
    assert np.array_equal(filled[0], masks[0]) and np.array_equal(filled[4], masks[1])
    areas = filled.sum(axis=(1, 2))
    assert np.all(np.diff(areas) > 0), "the size grows steadily from one clicked slice to the next"
    assert abs(areas[2] - np.pi * 7**2) < 0.1 * np.pi * 7**2, "half way: half way in radius"


def test_the_shape_between_two_slices_moves_half_way():
    filled = fill_between(np.stack([disc(6, (18, 18)), disc(6, (24, 22))]), [0, 2], (1.0, 1.0))
    assert np.allclose(np.argwhere(filled[1]).mean(axis=0), (21, 20), atol=0.5)


def test_an_empty_clicked_slice_ends_the_structure_half_way():
    masks = np.stack([disc(6), np.zeros((40, 40), dtype=bool)])
    filled = fill_between(masks, [0, 4], (1.0, 1.0))
    assert [bool(s.any()) for s in filled] == [True, True, False, False, False]
    assert np.array_equal(filled[1], masks[0])


def test_adjacent_clicked_slices_are_kept_as_they_are():
    masks = np.stack([disc(3), disc(5), disc(7)])
    assert np.array_equal(fill_between(masks, [10, 11, 12], (1.0, 1.0)), masks)

