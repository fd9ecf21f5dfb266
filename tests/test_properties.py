"""Property-based tests: whatever a client sends, the parser and CPD either refuse it with
PromptError or return prompts inside the image."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.spd.distillation import ContextualPromptDistiller
from lib.spd.prompts import PromptError, choose_slice_axis, parse_clicks, parse_roi, to_slice_clicks

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
    consensus.assign_boxes(anchors, tuple(in_plane))
    assert sorted(consensus.prompts) == list(range(first, last + 1))
    for p in consensus.prompts.values():
        for r, c in p.positives + p.negatives:
            assert 0 <= r <= in_plane[0] - 1 and 0 <= c <= in_plane[1] - 1
        r0, c0, r1, c1 = p.box
        assert 0 <= r0 <= r1 <= in_plane[0] - 1 and 0 <= c0 <= c1 <= in_plane[1] - 1
    handled = [d.source for d in consensus.decisions]
    assert sorted(handled) == [c.source for c in sclicks if c.positive]
