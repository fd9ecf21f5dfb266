"""The click simulator behaves like the annotator it models."""

import numpy as np

from lib.spd.training import ClickStyle, simulate_clicks


def tube(shape=(40, 40, 30), centre=(15, 15), radius=5):
    ii, jj = np.mgrid[: shape[0], : shape[1]]
    plane = (ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 <= radius**2
    vol = np.zeros(shape, dtype=bool)
    vol[:, :, 5:25] = plane[:, :, None]
    return vol


def test_one_click_every_k_slices_near_the_centre():
    clicks, off = simulate_clicks(tube(), (1, 1, 1), axis=2, style=ClickStyle(every=3, drift_mm=1.0, off_target=0.0),
                                  rng=np.random.default_rng(0))
    ks = [c[2] for c in clicks]
    assert np.all(np.diff(ks) == 3) and 5 <= ks[0] < 8 and ks[-1] < 25
    assert not any(off)
    d = [np.hypot(c[0] - 15, c[1] - 15) for c in clicks]
    assert np.mean(d) < 3.0


def test_off_target_clicks_land_on_the_distractor():
    target = tube()
    distractor = tube(centre=(30, 30), radius=3)
    clicks, off = simulate_clicks(target, (1, 1, 1), 2, ClickStyle(off_target=0.5), np.random.default_rng(1),
                                  distractor=distractor)
    assert any(off) and not all(off)
    for c, wrong in zip(clicks, off):
        assert distractor[tuple(c)] == wrong or not wrong


def test_off_target_without_distractor_is_far_from_the_structure():
    clicks, off = simulate_clicks(tube(), (1, 1, 1), 2, ClickStyle(off_target=1.0), np.random.default_rng(2))
    assert all(off)
    assert all(np.hypot(c[0] - 15, c[1] - 15) >= 9 for c in clicks)
