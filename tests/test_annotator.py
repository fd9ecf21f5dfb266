"""The benchmark's simulated annotators and its CT tube phantom do what the benchmark says they do."""

import numpy as np
from annotator import Annotator, clicks_for, corrective_click
from scipy import ndimage
from tube_phantom import make_tube_phantom


def two_structures(shape=(40, 48, 30)):
    """A tube along k (value 1) with a second one beside it (value 2)."""
    ii, jj = np.indices(shape[:2])
    labels = np.zeros(shape, dtype=np.uint8)
    for k in range(4, 26):
        labels[:, :, k][(ii - 20) ** 2 + (jj - 18) ** 2 <= 25] = 1
        labels[:, :, k][(ii - 20) ** 2 + (jj - 30) ** 2 <= 25] = 2
    return labels


def test_clicks_sit_on_the_view_axis_every_few_slices():
    labels = two_structures()
    for view, every in ((2, 3), (0, 4)):
        clicks, off = clicks_for(labels, 1, (1.0, 1.0, 1.0), Annotator(every=every, drift_mm=0.0, off_target=0.0,
                                                                        view=view), np.random.default_rng(0))
        steps = np.diff([c[view] for c in clicks])
        assert (steps == every).all() and not any(off)
        assert all(labels[tuple(c)] == 1 for c in clicks)


def test_off_target_clicks_land_off_the_structure_within_reach():
    labels = two_structures()
    clicks, off = clicks_for(labels, 1, (1.0, 1.0, 1.0), Annotator(every=1, off_target=1.0, reach_mm=15.0),
                             np.random.default_rng(1))
    assert all(off) and len(clicks) == 22
    assert all(labels[tuple(c)] != 1 for c in clicks)
    assert {int(labels[tuple(c)]) for c in clicks} == {0, 2}, "on the neighbour and on background"
    assert all(np.hypot(c[0] - 20, c[1] - 18) <= 15.5 for c in clicks)


def test_skipped_slices_thin_the_clicks():
    labels = two_structures()
    every = clicks_for(labels, 1, (1.0, 1.0, 1.0), Annotator(every=1, skip=0.0), np.random.default_rng(2))[0]
    some = clicks_for(labels, 1, (1.0, 1.0, 1.0), Annotator(every=1, skip=0.5), np.random.default_rng(2))[0]
    assert 0 < len(some) < len(every)


def test_tube_phantom_is_a_ct_whose_loops_touch():
    phantom = make_tube_phantom(seed=2)
    assert phantom.image.min() <= -900 and phantom.image.dtype == np.int16
    grown = ndimage.binary_dilation(phantom.labels == 1, iterations=2)
    touching = {int(v) for v in np.unique(phantom.labels[grown])} - {0, 1}
    assert touching, "the target loop touches at least one other loop"
    target_hu = np.median(phantom.image[phantom.labels == 1])
    neighbour_hu = np.median(phantom.image[phantom.labels == min(touching)])
    assert abs(target_hu - neighbour_hu) < 10, "same density: only the clicks' line tells them apart"


def test_corrective_clicks_go_to_the_largest_error_deep_or_anywhere_in_its_inner_half():
    truth = np.zeros((20, 20, 20), dtype=bool)
    truth[4:16, 4:16, 4:16] = True
    mask = truth.copy()
    mask[4:16, 4:16, 10:16] = False  # a large miss ...
    mask[0:2, 0:2, 0:2] = True  # ... and a small leak
    miss = truth & ~mask
    depth = ndimage.distance_transform_edt(np.pad(miss, 1))[1:-1, 1:-1, 1:-1]
    point, positive = corrective_click(mask, truth, (1.0, 1.0, 1.0))
    assert positive and miss[tuple(point)] and depth[tuple(point)] == depth.max()
    rng = np.random.default_rng(0)
    loose = [corrective_click(mask, truth, (1.0, 1.0, 1.0), rng) for _ in range(20)]
    assert all(p and miss[tuple(q)] and depth[tuple(q)] >= depth.max() / 2 for q, p in loose)
    assert len({tuple(q) for q, _ in loose}) > 5, "not always the same point"
    assert corrective_click(truth, truth, (1.0, 1.0, 1.0)) is None
