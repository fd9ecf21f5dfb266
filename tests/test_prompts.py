"""The prompt parser: what viewers send, and what it must refuse."""

import math

import numpy as np
import pytest

from lib.spd.method.prompts import Click, PromptError, choose_slice_axis, parse_clicks, parse_roi, to_slice_clicks

SHAPE = (20, 30, 40)


def test_parses_slicer_request():
    clicks = parse_clicks({"foreground": [[1, 2, 3], [4, 5, 6]], "background": [[7, 8, 9]]}, SHAPE)
    assert [c.ijk for c in clicks] == [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert [c.positive for c in clicks] == [True, True, False]


def test_accepts_integral_floats_and_missing_background():
    clicks = parse_clicks({"foreground": [[1.0, 2.0, 3.0]]}, SHAPE)
    assert clicks == [Click((1, 2, 3), True)]


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, "at least one foreground"),
        ({"foreground": []}, "at least one foreground"),
        ({"foreground": "1,2,3"}, "must be a list"),
        ({"foreground": [1, 2, 3]}, "foreground[0] must be a list of three"),
        ({"foreground": [[1, 2]]}, "list of three"),
        ({"foreground": [[1, 2, 3, 4]]}, "list of three"),
        ({"foreground": [[1, "a", 3]]}, "non-numeric"),
        ({"foreground": [[1, True, 3]]}, "non-numeric"),
        ({"foreground": [[1, math.nan, 3]]}, "non-finite"),
        ({"foreground": [[1, math.inf, 3]]}, "non-finite"),
        ({"foreground": [[1.5, 2, 3]]}, "not an integer"),
        ({"foreground": [[20, 0, 0]]}, "outside the image"),
        ({"foreground": [[0, -1, 0]]}, "outside the image"),
        ({"foreground": [[0, 0, 0]] * 100_000}, "at most"),
        ({"foreground": [[0, 0, 0]], "background": [[0, 0, 40]]}, "background[0]"),
    ],
)
def test_rejects_malformed_points(params, message):
    with pytest.raises(PromptError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_clicks(params, SHAPE)


def test_an_roi_box_is_a_prompt_without_clicks():
    with pytest.raises(PromptError, match="foreground point"):
        parse_clicks({"foreground": []}, SHAPE)
    assert parse_clicks({"foreground": [], "background": [[1, 2, 3]]}, SHAPE, box=True) == [Click((1, 2, 3), False)]


def test_rejects_non_3d_images():
    with pytest.raises(PromptError, match="3D"):
        parse_clicks({"foreground": [[0, 0, 0]]}, (5, 5, 5, 2))


def test_slice_axis_follows_click_extent_in_mm():
    clicks = [Click((5, 10, k), True) for k in range(10, 30, 3)]
    assert choose_slice_axis(clicks, (1.0, 1.0, 1.0)) == 2
    spread_in_j = [Click((5, j, 12), True) for j in range(2, 20, 3)]
    assert choose_slice_axis(spread_in_j, (1.0, 1.0, 1.0)) == 1
    single = [Click((5, 5, 5), True)]
    assert choose_slice_axis(single, (0.8, 0.8, 3.0)) == 2
    assert choose_slice_axis(single, (3.0, 0.8, 0.8)) == 0
    assert choose_slice_axis(clicks, (1.0, 1.0, 1.0), requested=0) == 0
    with pytest.raises(PromptError, match="slice_axis"):
        choose_slice_axis(clicks, (1.0, 1.0, 1.0), requested=3)


def test_slice_axis_is_the_stack_the_clicks_sit_on_whatever_an_outlier_does():
    """Clicks every 3rd axial slice along a short structure, one of them 15 mm off in-plane: the
    in-plane spread is now the largest, the stack is still axis 2, with and without skipped slices."""
    rng = np.random.default_rng(0)
    for trial in range(50):
        ks = [k for k in range(40, 61, 3) if rng.random() > 0.2] or [40, 43, 46]
        ks = ks if len(ks) >= 3 else [40, 43, 46]
        clicks = [Click((int(50 + rng.normal(0, 2)), int(60 + rng.normal(0, 2)), k), True) for k in ks]
        clicks[len(clicks) // 2] = Click((50 + 15, 60 - 12, ks[len(ks) // 2]), True)
        assert choose_slice_axis(clicks, (1.0, 1.0, 1.0)) == 2, clicks
        coronal = [Click((c.ijk[0], c.ijk[2], c.ijk[1]), True) for c in clicks]
        assert choose_slice_axis(coronal, (1.0, 1.0, 1.0)) == 1


def test_clicks_on_one_slice_segment_that_slice_axis():
    clicks = [Click((30, 40, 12), True), Click((33, 52, 12), True), Click((20, 41, 12), False)]
    assert choose_slice_axis(clicks, (1.0, 1.0, 1.0)) == 2


def test_slice_axis_leaves_no_one_voxel_wide_slices():
    spread_in_plane = [Click((10, 20, 0), True), Click((40, 30, 0), True)]
    assert choose_slice_axis(spread_in_plane, (0.8, 0.8, 3.0)) == 2  # both clicks on one slice of axis 2
    assert choose_slice_axis(spread_in_plane, (0.8, 0.8, 0.5), shape=(64, 64, 1)) == 2
    assert choose_slice_axis([Click((0, 5, 5), True)], (3.0, 1.0, 0.5), shape=(1, 64, 64)) == 0
    assert choose_slice_axis(spread_in_plane, (1.0, 1.0, 1.0), requested=2, shape=(64, 64, 1)) == 2
    with pytest.raises(PromptError, match=r"slice_axis 0 gives slices of 64x1 voxels.*use slice_axis 2"):
        choose_slice_axis(spread_in_plane, (1.0, 1.0, 1.0), requested=0, shape=(64, 64, 1))
    with pytest.raises(PromptError, match="no 2D slices"):
        choose_slice_axis([Click((3, 0, 0), True)], (1.0, 1.0, 1.0), shape=(64, 1, 1))


def test_slice_clicks_keep_in_plane_axis_order():
    (c,) = to_slice_clicks([Click((1, 2, 3), True)], axis=1)
    assert (c.slice, c.row, c.col) == (2, 1.0, 3.0)


def test_roi_forms():
    assert parse_roi([[2, 5], [0, 100], [3, 1]], SHAPE) == ((2, 5), (0, 29), (1, 3))
    assert parse_roi([2, 0, 1, 5, 29, 3], SHAPE) == ((2, 5), (0, 29), (1, 3))
    assert parse_roi(None, SHAPE) is None
    with pytest.raises(PromptError, match="roi"):
        parse_roi([[1, 2]], SHAPE)
    with pytest.raises(PromptError, match="overlap"):
        parse_roi([[50, 60], [0, 1], [0, 1]], SHAPE)
