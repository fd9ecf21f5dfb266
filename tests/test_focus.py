"""The focus region: a stable square around a structure's boxes, and the pipeline decoding in it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lib.spd.method import Click, SPDPipeline, choose_window
from lib.spd.method.focus import FocusConfig, focus_region
from lib.spd.runtime import load_backbone
from lib.spd.serving import EmbeddingCache
from tube_phantom import make_tube_phantom

CONFIG = FocusConfig()
LADDER = {int(np.ceil(CONFIG.min_side_px * CONFIG.ladder ** k)) for k in range(20)}


def test_the_region_holds_every_point_with_its_margin_and_its_side_is_on_the_ladder():
    rng = np.random.default_rng(0)
    for _ in range(300):
        shape = tuple(int(v) for v in rng.integers(120, 400, 2))
        pixel = tuple(float(v) for v in rng.uniform(0.5, 1.5, 2))
        points = rng.uniform(0, shape, (int(rng.integers(1, 12)), 2)) * rng.uniform(0.05, 0.3) + rng.uniform(
            0, 0.6, 2) * shape
        config = FocusConfig(margin_mm=float(rng.uniform(3, 20)))
        region = focus_region(points, pixel, shape, config)
        if region is None:
            continue
        room = config.margin_mm / np.array(pixel)
        for axis, span in enumerate(region):
            assert 0 <= span.start and span.stop <= shape[axis]
            assert span.stop - span.start in LADDER or span.stop - span.start == shape[axis]
            assert span.start <= max(points[:, axis].min() - room[axis], 0)
            assert min(points[:, axis].max() + room[axis], shape[axis] - 1) < span.stop


def test_a_region_near_the_whole_slice_is_the_whole_slice():
    assert focus_region([[40, 50], [120, 140]], (1.0, 1.0), (181, 217)) is not None
    assert focus_region([[40, 50], [120, 140]], (0.25, 0.25), (181, 217)) is None  # 4 mm is 16 pixels here
    assert focus_region([[40, 40], [150, 180]], (1.0, 1.0), (181, 217)) is None
    assert focus_region([], (1.0, 1.0), (181, 217)) is None


def test_the_last_region_is_kept_while_the_clicks_fit_in_it():
    points = np.array([[90.0, 100.0], [94.0, 104.0], [97.0, 101.0]])
    first = focus_region(points, (1.0, 1.0), (181, 217))
    moved = [focus_region(points + shift, (1.0, 1.0), (181, 217), previous=first) for shift in (-1, 0, 1)]
    assert all(region == first for region in moved)
    far = focus_region(points + 30, (1.0, 1.0), (181, 217), previous=first)
    assert far != first
    large = focus_region(points, (1.0, 1.0), (181, 217), FocusConfig(margin_mm=30.0))
    small = focus_region(points, (1.0, 1.0), (181, 217), previous=large)
    assert small == first, "a much larger region is not kept"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_backbone(cache_dir=str(tmp_path_factory.mktemp("runtime")))


def tube(shape=(160, 160, 12), centre=(80, 76), radius=6, seed=0):
    """A bright tube in noisy background, small against its slices."""
    rng = np.random.default_rng(seed)
    ii, jj = np.mgrid[: shape[0], : shape[1]]
    volume = rng.normal(100, 8, shape).astype(np.float32)
    target = np.zeros(shape, dtype=bool)
    for k in range(1, shape[2] - 1):
        target[:, :, k] = (ii - centre[0] - 0.4 * k) ** 2 + (jj - centre[1]) ** 2 <= radius ** 2
    volume[target] += 120
    return volume, target


def test_the_pipeline_decodes_in_the_region_and_answers_in_volume_coordinates(backbone):
    volume, target = tube()
    clicks = [Click((81, 77, 2), True), Click((82, 75, 5), True), Click((84, 77, 8), True), Click((84, 76, 10), True)]
    window = choose_window(volume)
    cache = EmbeddingCache(1 << 30)
    focused = SPDPipeline(backbone, cache)
    seg = focused.segment(volume, (1.0, 1.0, 1.0), "small-tube", clicks, window, slice_axis=2)
    whole = SPDPipeline(backbone, cache, focus=None).segment(volume, (1.0, 1.0, 1.0), "small-tube", clicks, window,
                                                             slice_axis=2)
    assert whole.focus is None and seg.focus is not None
    assert seg.predicted_iou["focus square"] >= seg.predicted_iou["whole slices"], "the decoder trusts the square more"
    rows, cols = seg.focus
    assert rows.stop - rows.start < 100 and cols.stop - cols.start < 100
    outside = seg.mask.copy()
    outside[rows, cols, :] = False
    assert not outside.any(), "nothing is segmented outside the region"
    assert 2 * (seg.mask & target).sum() / (seg.mask.sum() + target.sum()) > 0.85
    assert 2 * (whole.mask & target).sum() / (whole.mask.sum() + target.sum()) > 0.85
    assert {tuple(c["ijk"]) for c in seg.consensus["kept"]} == {c.ijk for c in clicks}, "clicks are kept in place"

    nudged = clicks[:-1] + [Click((85, 76, 10), True)]  # a correction of one click: same region, cached embeddings
    again = focused.segment(volume, (1.0, 1.0, 1.0), "small-tube", nudged, window, slice_axis=2)
    assert again.focus == seg.focus
    assert again.timings["place"] < seg.timings["place"] / 5
    off = focused.segment(volume, (1.0, 1.0, 1.0), "small-tube", clicks, window, slice_axis=2, focus=False)
    assert off.focus is None and (off.mask == whole.mask).all()


def test_whole_slices_are_kept_where_the_decoder_trusts_them_more(backbone):
    """On the CT tube phantom (tubes of 12-16 mm touching their neighbours, high contrast) the decoder predicts a
    lower IoU for its masks on the focus square than on whole slices, and those masks are worse: SPD keeps the
    whole slices' masks and says so."""
    phantom = make_tube_phantom(0, shape=(160, 160, 16))
    target = phantom.labels == 1
    clicks = [Click(tuple(int(round(v)) for v in (*ndimage.center_of_mass(target[:, :, k]), k)), True)
              for k in range(1, 16, 3)]
    window = choose_window(phantom.image)
    pipeline = SPDPipeline(backbone, EmbeddingCache(1 << 30))
    seg = pipeline.segment(phantom.image, phantom.spacing, "tubes", clicks, window, slice_axis=2)
    assert seg.predicted_iou["whole slices"] > seg.predicted_iou["focus square"]
    assert seg.focus is None
    whole = pipeline.segment(phantom.image, phantom.spacing, "tubes", clicks, window, slice_axis=2, focus=False)
    assert set(whole.predicted_iou) == {"served"} and (seg.mask == whole.mask).all()
    assert 2 * (seg.mask & target).sum() / (seg.mask.sum() + target.sum()) > 0.9
