"""Property-based tests: whatever a client sends, the parser and CPD either refuse it with
PromptError or return prompts inside the image."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.spd.method.distillation import ContextualPromptDistiller
from lib.spd.method.prompts import PromptError, SliceClick, choose_slice_axis, parse_clicks, parse_roi, to_slice_clicks

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=20,
)
near_points = st.lists(st.lists(st.integers(-3, 45) | st.floats(-3, 45) | st.sampled_from([float("nan"), True, "1"]),
                                max_size=4), max_size=6)
shapes = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40))


@settings(max_examples=300, deadline=None)
@given(shape=shapes, foreground=junk | near_points, background=junk | near_points, roi=junk | near_points, axis=junk)
def test_parser_refuses_or_returns_points_inside(shape, foreground, background, roi, axis):
    try:
        clicks = parse_clicks({"foreground": foreground, "background": background}, shape)
        parse_roi(roi, shape)
        choose_slice_axis(clicks, (1.0, 1.0, 1.0), axis)
    except PromptError:
        return
    assert clicks and any(c.positive for c in clicks)
    for c in clicks:
        assert all(0 <= v < n for v, n in zip(c.ijk, shape))


point = st.tuples(st.integers(0, 19), st.integers(0, 23), st.integers(0, 29))


@settings(max_examples=60, deadline=None)
@given(fg=st.lists(point, min_size=1, max_size=12), bg=st.lists(point, max_size=4), seed=st.integers(0, 2**16),
       axis=st.integers(0, 2))
def test_distillation_keeps_every_prompt_inside_the_image(fg, bg, seed, axis):
    shape = (20, 24, 30)
    clicks = parse_clicks({"foreground": [list(p) for p in fg], "background": [list(p) for p in bg]}, shape)
    sclicks = to_slice_clicks(clicks, axis)
    in_plane = [shape[a] for a in range(3) if a != axis]
    first = min(c.slice for c in sclicks)
    last = max(c.slice for c in sclicks)
    saliency = np.random.default_rng(seed).random((last - first + 1, *in_plane)).astype(np.float32)
    consensus = ContextualPromptDistiller((1.0, 1.5)).distill(sclicks, saliency, first)
    anchors = {s: (0.0, 0.0, in_plane[0] - 1.0, in_plane[1] - 1.0) for s, p in consensus.prompts.items() if p.anchored}
    consensus.assign_boxes(anchors)
    assert sorted(consensus.prompts) == list(range(first, last + 1))
    for p in consensus.prompts.values():
        for r, c in p.positives + p.negatives:
            assert 0 <= r <= in_plane[0] - 1 and 0 <= c <= in_plane[1] - 1
        r0, c0, r1, c1 = p.box
        assert 0 <= r0 <= r1 <= in_plane[0] - 1 and 0 <= c0 <= c1 <= in_plane[1] - 1
    handled = [d.source for d in consensus.decisions]
    assert sorted(handled) == [c.source for c in sclicks if c.positive]


def _line_scene(n_slices: int, slope: float, col: float, radius: int = 5):
    """Saliency maps of a disc following the line row = 20 + slope * slice, and that line's points."""
    rr, cc = np.mgrid[:64, :64]
    maps = np.zeros((n_slices, 64, 64), dtype=np.float32)
    for s in range(n_slices):
        maps[s][(rr - (20 + slope * s)) ** 2 + (cc - col) ** 2 <= radius ** 2] = 1.0
    return maps


@settings(max_examples=60, deadline=None)
@given(every=st.integers(1, 5), slope=st.floats(-0.6, 0.6), col=st.floats(15, 45),
       jitter=st.lists(st.tuples(st.floats(-2, 2), st.floats(-2, 2)), min_size=12, max_size=12))
def test_distillation_leaves_clean_clicks_as_they_are(every, slope, col, jitter):
    """Clicks on a straight structure (inside the image, as the parser guarantees: |slope| <= 0.6 keeps the
    rows 20 + slope * slice +- 2 within 0..63 over 30 slices) are all kept where they are."""
    maps = _line_scene(30, slope, col)
    clicks = [SliceClick(s, 20 + slope * s + dr, col + dc, True, n)
              for n, (s, (dr, dc)) in enumerate(zip(range(1, 29, every), jitter))]
    consensus = ContextualPromptDistiller((1.0, 1.0)).distill(clicks, maps, 0)
    assert all(d.status == "kept" for d in consensus.decisions), [d.reason for d in consensus.decisions]
    for c in clicks:
        assert consensus.prompts[c.slice].positives == [(c.row, c.col)]


@settings(max_examples=60, deadline=None)
@given(every=st.integers(2, 4), slope=st.floats(-0.5, 0.5), offset=st.tuples(st.floats(10, 25), st.floats(-25, 25)),
       where=st.floats(0, 1), salient=st.booleans())
def test_one_off_target_click_does_not_change_the_other_clicks(every, slope, offset, where, salient):
    """Whatever one off-target click does to its own slice, the prompts of the other clicks' slices stay
    as they were without it (on a decoy or on background)."""
    maps = _line_scene(30, slope, 30.0)
    slices = list(range(1, 29, every))
    clean = [SliceClick(s, 20 + slope * s, 30.0, True, n) for n, s in enumerate(slices)]
    bad_slice = slices[int(where * (len(slices) - 1))]
    bad = SliceClick(bad_slice, float(np.clip(20 + slope * bad_slice + offset[1], 0, 63)),
                     float(np.clip(30.0 + offset[0], 0, 63)), True, len(clean))
    if salient:  # the click lands on a decoy that looks like the target
        rr, cc = np.mgrid[:64, :64]
        maps[bad_slice][(rr - bad.row) ** 2 + (cc - bad.col) ** 2 <= 16] = 1.0
    without = ContextualPromptDistiller((1.0, 1.0)).distill([c for c in clean if c.slice != bad_slice], maps, 0)
    with_bad = ContextualPromptDistiller((1.0, 1.0)).distill([c for c in clean if c.slice != bad_slice] + [bad],
                                                             maps, 0)
    for c in clean:
        if c.slice != bad_slice:
            assert with_bad.prompts[c.slice].positives == without.prompts[c.slice].positives
    decision = next(d for d in with_bad.decisions if d.source == bad.source)
    if salient and bad_slice in (slices[0], slices[-1]):  # beyond the others the line only extrapolates
        assert decision.status == "kept" and "extrapolated" in decision.reason, decision
    else:
        assert decision.status in ("moved", "rejected") and "off the line" in decision.reason, decision
    assert decision.slice == bad_slice, "a moved click stays on its own slice"
