"""The SPD pipeline end to end on synthetic phantoms with the real LiteMedSAM backbone (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from lib.spd.method import (Click, Interactions, SaliencyHead, Segmentation, SPDPipeline, TrainedState, VolumeView,
                            choose_window, learn_size_prior)
from lib.spd.method.interaction import Session
from lib.spd.method.box_prompt import segment_box
from lib.spd.runtime import load_backbone
from lib.spd.serving import EmbeddingCache


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_backbone(cache_dir=str(tmp_path_factory.mktemp("runtime")))


SHARED = EmbeddingCache(1 << 30)  # one cache for the module; volume ids name each phantom


def phantom(shape=(64, 72, 24), centre=(30, 36), radius=9, z=(4, 20), seed=0, decoy=(12, 60, 6)):
    """A bright tube (the target) and a bright decoy disc in noisy background, MR-like intensities."""
    rng = np.random.default_rng(seed)
    ii, jj = np.mgrid[: shape[0], : shape[1]]
    volume = rng.normal(100, 8, shape).astype(np.float32)
    target = np.zeros(shape, dtype=bool)
    for k in range(z[0], z[1]):
        disc = (ii - centre[0] - 0.3 * (k - z[0])) ** 2 + (jj - centre[1]) ** 2 <= radius**2
        target[:, :, k] = disc
    decoy = (ii - decoy[0]) ** 2 + (jj - decoy[1]) ** 2 <= decoy[2] ** 2
    volume[target] += 120
    volume[decoy[:, :, None].repeat(shape[2], axis=2)] += 120
    return volume, target


def run(backbone, volume, clicks, volume_id, spacing=(1.0, 1.0, 1.0), cache=None, **kwargs):
    pipeline = SPDPipeline(backbone, cache or SHARED, **kwargs)
    return pipeline, pipeline.segment(volume, spacing, volume_id, [Click(tuple(c), True) for c in clicks],
                                      choose_window(volume), slice_axis=2)


def dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_rough_clicks_segment_the_tube_and_ignore_the_decoy(backbone):
    volume, target = phantom()
    clicks = [[31, 38, 6], [33, 34, 9], [12, 60, 12], [34, 37, 15], [36, 35, 18]]  # the 3rd is on the decoy
    _, seg = run(backbone, volume, clicks, "tube")
    assert dice(seg.mask, target) > 0.85
    assert not seg.mask[12, 60].any(), "the decoy is not segmented"
    assert not seg.mask[:, :, :3].any() and not seg.mask[:, :, 21:].any(), "nothing past the tube's ends"
    assert any(c["click"] == 2 for c in seg.consensus["moved"] + seg.consensus["rejected"])


def test_cached_memoised_and_chunked_runs_agree(backbone, tmp_path):
    volume, _ = phantom(seed=1)
    clicks = [[31, 38, 6], [33, 36, 10], [35, 36, 14]]
    pipeline, first = run(backbone, volume, clicks, "tube1", cache=EmbeddingCache(1 << 30, tmp_path))
    again = pipeline.segment(volume, (1.0, 1.0, 1.0), "tube1", [Click(tuple(c), True) for c in clicks],
                             choose_window(volume), slice_axis=2)
    pipeline.cache.flush()  # the next cache reads the files
    _, cold_memo_one_by_one = run(backbone, volume, clicks, "tube1", cache=EmbeddingCache(1 << 30, tmp_path),
                                  decode_chunk=1)
    assert again.timings["embed"] < first.timings["embed"]
    assert (first.mask == again.mask).all()
    assert (first.mask == cold_memo_one_by_one.mask).all()


def test_a_re_click_reads_neither_the_cache_nor_the_volume(backbone, monkeypatch):
    volume, _ = phantom(seed=3)
    clicks, nudged = [[31, 38, 6], [33, 36, 10], [35, 36, 14]], [[31, 38, 6], [33, 37, 10], [35, 36, 14]]
    _, fresh = run(backbone, volume, nudged, "tube3", cache=EmbeddingCache(1 << 30))
    pipeline, _ = run(backbone, volume, clicks, "tube3", cache=EmbeddingCache(1 << 30))
    reads = []
    monkeypatch.setattr(pipeline.cache, "get", lambda *args, **kwargs: reads.append("cache"))
    monkeypatch.setattr(VolumeView, "voxels", lambda *args: reads.append("volume"))
    again = pipeline.segment(volume, (1.0, 1.0, 1.0), "tube3", [Click(tuple(c), True) for c in nudged],
                             choose_window(volume), slice_axis=2)
    assert not reads and (again.mask == fresh.mask).all()


def test_single_slice_volume(backbone):
    volume, target = phantom(shape=(64, 72, 1), z=(0, 1))
    _, seg = run(backbone, volume, [[31, 37, 0]], "single")
    assert seg.mask.shape == volume.shape and dice(seg.mask, target) > 0.8


def test_long_volume_embeds_only_what_the_request_needs(backbone):
    volume, _ = phantom(shape=(32, 32, 2000), centre=(16, 16), radius=5, z=(1000, 1010))
    pipeline, seg = run(backbone, volume, [[16, 16, 1002], [17, 16, 1005], [18, 16, 1008]], "long")
    first, last = seg.slice_range
    assert (first, last) == (1001, 1009), "the clicked slices plus half a click gap each side"
    key = pipeline.cache_key("long", VolumeView(volume, 2, choose_window(volume)))
    assert len(pipeline.cache.missing(key, range(2000))) == 2000 - (last - first + 1)
    assert seg.mask[:, :, :990].sum() == 0 and seg.mask[:, :, 1020:].sum() == 0


def test_anisotropic_spacing(backbone):
    """0.4 mm in-plane, 6 mm slices: the same 8 mm tube as above in a 160x180 px field of view."""
    volume, target = phantom(shape=(160, 180, 24), centre=(75, 90), radius=20, decoy=(30, 150, 15), seed=2)
    clicks = [[76, 92, 6], [79, 90, 12], [80, 89, 18]]
    _, seg = run(backbone, volume, clicks, "wide", spacing=(0.4, 0.4, 6.0))
    assert dice(seg.mask, target) > 0.7


def test_a_trained_head_is_used_only_on_the_axis_it_was_trained_on(backbone):
    """A head trained on slices of one axis knows nothing of another axis' slices: appearance saliency
    is used there, and the result says which saliency was used."""
    volume, _ = phantom()
    clicks = [[31, 38, 6], [33, 34, 9], [34, 37, 15], [36, 35, 18]]
    for head_axis, expected in ((2, "trained head (axis 2)"), (0, "appearance")):
        heads = {"tube": SaliencyHead(["tube"], in_channels=256, width=8, axis=head_axis).for_label("tube")}
        pipeline = SPDPipeline(backbone, SHARED, TrainedState(saliency_heads=heads))
        seg = pipeline.segment(volume, (1.0, 1.0, 1.0), "tube", [Click(tuple(c), True) for c in clicks],
                               choose_window(volume), label="tube", slice_axis=2)
        assert seg.saliency == expected


def test_a_trained_heads_maps_are_remembered_per_slice_until_another_state_is_served(backbone):
    """Maps asked for again come from memory (the head runs only on slices it has not seen) and equal the head's
    own maps; serving another state forgets them."""
    volume, _ = phantom()
    head = SaliencyHead(["tube"], in_channels=256, width=8, axis=2).for_label("tube")
    runs = []
    head.head.register_forward_hook(lambda module, args, out: runs.append(len(args[0])))
    pipeline = SPDPipeline(backbone, SHARED, TrainedState(saliency_heads={"tube": head}))
    view = VolumeView(volume, 2, choose_window(volume))
    first = pipeline.trained_saliency("tube", view, "tube", [3, 4, 5, 6])
    again = pipeline.trained_saliency("tube", view, "tube", [5, 6, 7])
    assert sum(runs) == 5, "the head ran on slices 3-7 once each"
    np.testing.assert_array_equal(again[:2], first[2:])
    np.testing.assert_allclose(again, head(view.slices([5, 6, 7]), pipeline.embed("tube", view, [5, 6, 7]), []),
                               atol=1e-6)
    pipeline.serve(pipeline.state.replace())
    pipeline.trained_saliency("tube", view, "tube", [5])
    assert sum(runs) == 5 + 3 + 1, "the direct call ran it on three slices; serving forgot slice 5"


def test_learned_sizes_set_the_probes_on_their_axis_and_the_result_says_so(backbone):
    """With a size prior of the tube's own axis the probes follow it, with one of another axis the default
    squares are used; the result says which, and the tube is found either way."""
    volume, target = phantom()
    clicks = [Click(tuple(c), True) for c in [[31, 38, 6], [33, 34, 9], [34, 37, 15], [36, 35, 18]]]
    for prior_axis, expected in ((2, "learned sizes (axis 2)"), (0, "default sizes")):
        prior = learn_size_prior([(target, (1.0, 1.0, 1.0))], prior_axis)
        pipeline = SPDPipeline(backbone, SHARED, TrainedState(size_priors={"tube": prior}))
        seg = pipeline.segment(volume, (1.0, 1.0, 1.0), "tube", clicks, choose_window(volume), label="tube",
                               slice_axis=2)
        assert seg.box_probes == expected and dice(seg.mask, target) > 0.7


def test_a_box_on_one_slice_segments_the_structure_it_holds_along_the_slices(backbone):
    volume, target = phantom(seed=4)
    pipeline = SPDPipeline(backbone, SHARED)
    rows, cols = np.nonzero(target[:, :, 12])
    roi = ((int(rows.min()) - 2, int(rows.max()) + 2), (int(cols.min()) - 2, int(cols.max()) + 2), (12, 12))
    seg = segment_box(pipeline, volume, (1.0, 1.0, 1.0), "box", choose_window(volume), roi)
    assert seg.axis == 2, "the axis the box is one slice thick along"
    assert dice(seg.mask, target) > 0.8
    assert not seg.mask[12, 60].any(), "the decoy is not segmented"
    first, last = seg.slice_range
    assert first <= 6 and last >= 17, "followed from the boxed slice towards both ends of the tube"
    assert not seg.mask[:, :, :3].any() and not seg.mask[:, :, 21:].any(), "nothing past the tube's ends"
    outside = np.ones(volume.shape[:2], dtype=bool)
    outside[roi[0][0]:roi[0][1] + 1, roi[1][0]:roi[1][1] + 1] = False
    assert not seg.mask[:, :, 12][outside].any(), "nothing outside the box on its slice"


def test_a_draft_embeds_only_the_clicked_slices_and_the_same_clicks_later_get_the_full_result(backbone):
    volume, target = phantom(seed=5)
    clicks = [[31, 37, 4], [32, 36, 7], [12, 60, 10], [33, 37, 13], [34, 36, 16], [35, 36, 19]]  # one on the decoy
    window = choose_window(volume)
    pipeline = SPDPipeline(backbone, EmbeddingCache(1 << 30))
    prompts = [Click(tuple(c), True) for c in clicks]
    draft = pipeline.segment(volume, (1.0, 1.0, 1.0), "draft", prompts, window, slice_axis=2, draft=True)
    key = pipeline.cache_key("draft", VolumeView(volume, 2, window))
    assert draft.draft == {"slices_segmented": 6, "slices_filled": 10, "slices_to_embed": 12}
    assert pipeline.cache.missing(key, range(24)) == [s for s in range(24) if s not in (4, 7, 10, 13, 16, 19)]
    assert draft.slice_range == (4, 19) and all(draft.mask[:, :, s].any() for s in range(4, 20))
    assert dice(draft.mask[:, :, 4:20], target[:, :, 4:20]) > 0.8 and not draft.mask[12, 60].any()
    decisions = {c["click"]: c for status in ("kept", "moved", "rejected") for c in draft.consensus[status]}
    assert sorted(decisions) == list(range(6)) and decisions[2]["status"] != "kept"
    assert [decisions[n]["ijk"][2] for n in range(6)] == [c[2] for c in clicks], "the volume's slices"

    pipeline.embed("draft", VolumeView(volume, 2, window), range(3, 21))
    full = pipeline.segment(volume, (1.0, 1.0, 1.0), "draft", prompts, window, slice_axis=2, draft=True)
    assert full.draft is None and full.slice_range == (3, 20)
    reference = SPDPipeline(backbone, pipeline.cache).segment(volume, (1.0, 1.0, 1.0), "draft", prompts, window,
                                                              slice_axis=2)
    assert np.array_equal(full.mask, reference.mask)
    assert dice(full.mask, target) > 0.85


def test_a_negative_click_on_the_annotators_own_positive_click_takes_it_back(backbone):
    """An annotator clicked the decoy among the tube's clicks and the result holds it on slices 9-11. A negative click
    on that same spot takes the positive one back: the decoy goes there (within the reach), the tube stays. Before,
    the annotator's own positive click defended the decoy and the negative click changed nothing."""
    volume, target = phantom()
    decoy = np.zeros_like(target)
    decoy[:, :, 9:12] = volume[:, :, 9:12] > 180
    decoy &= ~target
    mask = target | decoy
    tube = [Click((30 + round(0.3 * (k - 4)), 36, k), True) for k in range(5, 20, 3)]
    wrong = Click((12, 60, 10), True)
    clicks = [*tube, wrong]
    defenders = np.array([c.ijk[2:] + c.ijk[:2] for c in clicks], dtype=float)  # (slice, row, col) on axis 2
    seg = Segmentation(mask, 2, (4, 19), {})
    interactions = Interactions(SPDPipeline(backbone, SHARED))
    interactions.store.put("key", Session(tuple(clicks), 2, None, None, seg, np.zeros(volume.shape, dtype=bool),
                                          defenders, 3))
    out = interactions.run("key", volume, (1.0, 1.0, 1.0), "tube", [*clicks, Click(wrong.ijk, False)],
                           choose_window(volume), slice_axis=2)
    assert out.record["mode"] == "correction"
    corrected = out.segmentation.mask
    assert not (corrected & decoy).any(), "the decoy went on every slice it was on"
    np.testing.assert_array_equal(corrected & target, target)
