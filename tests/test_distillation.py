"""Contextual prompt distillation on a synthetic two-tube scene.

The target and a neighbouring tube look alike (both salient), 20 px apart, so only the agreement of
clicks across slices can tell an off-target click from a good one.
"""

import numpy as np
import pytest
import torch

from lib.spd.method.distillation import ContextualPromptDistiller, CPDConfig, theil_sen_predict
from lib.spd.method.prompts import SliceClick

N, H, W = 30, 64, 64
TARGET_COL, NEIGHBOUR_COL = 20, 40


def target_centre(s: int) -> tuple[float, float]:
    return 20.0 + 0.3 * s, float(TARGET_COL)  # drifts slowly across slices, like a curved structure


def scene() -> np.ndarray:
    """Saliency maps (N, H, W): two discs of radius 5 per slice."""
    rr, cc = np.mgrid[:H, :W]
    maps = np.zeros((N, H, W), dtype=np.float32)
    for s in range(N):
        r, _ = target_centre(s)
        maps[s][(rr - r) ** 2 + (cc - TARGET_COL) ** 2 <= 25] = 1.0
        maps[s][(rr - r) ** 2 + (cc - NEIGHBOUR_COL) ** 2 <= 25] = 1.0
    return maps


def clicks_every(k: int, off_target_slice: int | None = None, drift=(0.0, 0.0)) -> list[SliceClick]:
    out = []
    for n, s in enumerate(range(2, N - 2, k)):
        r, c = target_centre(s)
        if s == off_target_slice:
            c = float(NEIGHBOUR_COL)
        out.append(SliceClick(s, r + drift[0], c + drift[1], True, n))
    return out


def in_target(s: int, row: float, col: float) -> bool:
    r, _ = target_centre(s)
    return (row - r) ** 2 + (col - TARGET_COL) ** 2 <= 25


def test_off_target_click_is_moved_onto_target_or_rejected():
    clicks = clicks_every(3, off_target_slice=14)
    consensus = ContextualPromptDistiller((1.0, 1.0)).distill(clicks, scene(), 0)
    bad = next(d for d in consensus.decisions if d.slice == 14)
    assert bad.status in ("moved", "rejected"), bad
    if bad.status == "moved":
        assert in_target(14, bad.new_row, bad.new_col)
    assert "off the line" in bad.reason
    good = [d for d in consensus.decisions if d.slice != 14]
    assert all(d.status == "kept" for d in good)


def test_without_cross_slice_check_the_off_target_click_would_survive():
    """Control: the neighbour is salient, so a saliency-only check cannot catch the bad click."""
    clicks = [c for c in clicks_every(3, off_target_slice=14) if c.slice == 14]
    consensus = ContextualPromptDistiller((1.0, 1.0)).distill(clicks, scene(), 0)
    assert consensus.decisions[0].status == "kept"


def test_three_drifting_clicks_on_target_are_kept():
    """Each of three clicks has only two others to draw a line: too few to tell a bad click from a bad line.
    (Extrapolated from two clicks 3 px off the centre either way, the line put the end clicks 12 px off.)"""
    clicks = [SliceClick(s, target_centre(s)[0] + dr, TARGET_COL + dc, True, n)
              for n, (s, dr, dc) in enumerate([(8, 0.0, 3.0), (11, 0.0, -3.0), (14, 0.0, 3.0)])]
    consensus = ContextualPromptDistiller((1.0, 1.0)).distill(clicks, scene(), 0)
    assert [d.status for d in consensus.decisions] == ["kept"] * 3, [d.reason for d in consensus.decisions]


def test_a_click_far_beyond_the_others_gets_a_wider_tolerance():
    """The line's error grows away from the clicks that draw it: a click 8 px off where the line points is moved
    between the others but kept two gaps past the last of them."""
    clicks = clicks_every(3)[:6]  # slices 2 .. 17
    r, c = target_centre(11)
    between = ContextualPromptDistiller((1.0, 1.0)).distill(clicks[:3] + [SliceClick(11, r, c - 8.0, True, 9)] + clicks[4:], scene(), 0)
    assert [d.status for d in between.decisions if d.source == 9] == ["moved"]
    r, c = target_centre(23)
    beyond = ContextualPromptDistiller((1.0, 1.0)).distill(clicks + [SliceClick(23, r, c - 8.0, True, 9)], scene(), 0)
    assert [d.status for d in beyond.decisions if d.source == 9] == ["kept"], [d.reason for d in beyond.decisions]


def test_drifted_click_off_saliency_is_snapped_back():
    clicks = clicks_every(3)
    r, c = target_centre(8)
    clicks[2] = SliceClick(8, r, c - 7.0, True, 2)  # 7 px off: outside the disc, not on the neighbour
    consensus = ContextualPromptDistiller((1.0, 1.0), CPDConfig(snap_radius_mm=4.0)).distill(clicks, scene(), 0)
    d = next(d for d in consensus.decisions if d.slice == 8)
    assert d.status == "moved" and in_target(8, d.new_row, d.new_col)


def test_slices_between_clicks_are_filled_inside_the_target():
    clicks = clicks_every(4)
    consensus = ContextualPromptDistiller((1.0, 1.0)).distill(clicks, scene(), 0)
    assert sorted(consensus.prompts) == list(range(N))
    first, last = consensus.anchored_range
    for s in range(first, last + 1):
        p = consensus.prompts[s]
        assert p.anchored == any(c.slice == s for c in clicks)
        assert all(in_target(s, r, c) for r, c in p.positives), (s, p.positives)


def test_boxes_carry_anchor_extents_to_every_slice():
    clicks = clicks_every(4)
    consensus = ContextualPromptDistiller((1.0, 1.0)).distill(clicks, scene(), 0)
    anchor_boxes = {}
    for s, p in consensus.prompts.items():
        if p.anchored:
            r, _ = target_centre(s)
            anchor_boxes[s] = (r - 6, TARGET_COL - 6, r + 6, TARGET_COL + 6)
    anchor_boxes[10] = (0.0, 0.0, 63.0, 63.0)  # one wild anchor: the median over neighbours ignores it
    consensus.assign_boxes(anchor_boxes)
    for s in range(N):
        r0, c0, r1, c1 = consensus.prompts[s].box
        assert r0 <= target_centre(s)[0] <= r1 and c0 <= TARGET_COL <= c1
        assert c1 < NEIGHBOUR_COL - 3, f"slice {s}: box {consensus.prompts[s].box} swallows the neighbour"


def test_the_line_of_drifting_clicks_runs_nearer_the_middle_than_the_clicks():
    """Clicks that drift 4 px (RMS) off the centre: the line of the others puts each clicked slice's point nearer
    to it, on average; with three clicks there are too few others to draw the line."""
    rng = np.random.default_rng(3)
    clicks = [SliceClick(c.slice, c.row + dr, c.col + dc, True, n)
              for n, (c, (dr, dc)) in enumerate(zip(clicks_every(2), rng.normal(0.0, 4.0 / np.sqrt(2), (N, 2))))]
    points = ContextualPromptDistiller((1.0, 1.0)).line_points(clicks, (H, W))
    assert [s for s, _, _ in points] == [c.slice for c in clicks]
    off_click = np.mean([np.hypot(c.row - target_centre(c.slice)[0], c.col - TARGET_COL) for c in clicks])
    off_line = np.mean([np.hypot(r - target_centre(s)[0], c - TARGET_COL) for s, r, c in points])
    assert off_line < 0.6 * off_click, (off_line, off_click)
    assert ContextualPromptDistiller((1.0, 1.0)).line_points(clicks[:3], (H, W)) == []


def test_a_clicks_drift_inside_the_structure_does_not_move_the_boxes():
    """Boxes go where the decoder measured the structure: clicks drifting by +-3 px inside it, alternately
    on each side, leave every slice's box centred on the structure."""
    clicks = [SliceClick(c.slice, c.row + (3.0 if n % 2 else -3.0), c.col, True, n)
              for n, c in enumerate(clicks_every(4))]
    consensus = ContextualPromptDistiller((1.0, 1.0)).distill(clicks, scene(), 0)
    assert all(d.status == "kept" for d in consensus.decisions)
    measured = {s: (target_centre(s)[0] - 6, TARGET_COL - 6, target_centre(s)[0] + 6, TARGET_COL + 6)
                for s, p in consensus.prompts.items() if p.anchored}
    consensus.assign_boxes(measured)
    first, last = consensus.anchored_range
    for s in range(first, last + 1):
        r0, _, r1, _ = consensus.prompts[s].box
        assert abs((r0 + r1) / 2 - target_centre(s)[0]) < 0.5, (s, consensus.prompts[s].box)


def test_record_lists_added_and_rejected_in_ijk():
    clicks = clicks_every(3, off_target_slice=14)
    consensus = ContextualPromptDistiller((1.0, 1.0)).distill(clicks, scene(), 0)
    record = consensus.record(in_plane=[0, 1], axis=2)
    assert set(record) == {"kept", "moved", "rejected", "added"}
    assert len(record["kept"]) + len(record["moved"]) + len(record["rejected"]) == len(clicks)
    assert len(record["added"]) == N - len(clicks) + len(record["rejected"])
    assert all(len(a["ijk"]) == 3 and a["ijk"][2] in range(N) for a in record["added"])


def test_negative_clicks_reach_their_slice():
    clicks = clicks_every(3) + [SliceClick(5, 20.0, 40.0, False, 99)]
    consensus = ContextualPromptDistiller((1.0, 1.0)).distill(clicks, scene(), 0)
    assert consensus.prompts[5].negatives == [(20.0, 40.0)]


def test_all_clicks_rejected_falls_back_to_the_users_clicks():
    empty = np.zeros((N, H, W), dtype=np.float32)
    clicks = clicks_every(3)
    clicks[3] = SliceClick(clicks[3].slice, 5.0, 5.0, True, 3)
    consensus = ContextualPromptDistiller((1.0, 1.0)).distill(clicks, empty, 0)
    assert consensus.prompts and all(d.status in ("kept", "rejected") for d in consensus.decisions)
    assert any(d.status == "kept" for d in consensus.decisions)


@pytest.mark.parametrize("outlier", [0, 2, 5])
def test_theil_sen_ignores_one_outlier(outlier):
    s = np.arange(6, dtype=float)
    v = 2.0 * s + 1.0
    v[outlier] += 30.0
    assert theil_sen_predict(s, v, 10.0) == pytest.approx(21.0, abs=1.0)


def nearest_by_brute_force(saliency: np.ndarray, centre, pixel_mm, radius_mm: float, threshold: float):
    """Every pixel of the slice looked at: the salient one nearest to ``centre`` within the radius, the first in
    row-major order on ties."""
    rr, cc = np.mgrid[: saliency.shape[0], : saliency.shape[1]]
    d = ((rr - centre[0]) * pixel_mm[0]) ** 2 + ((cc - centre[1]) * pixel_mm[1]) ** 2
    d[(saliency < threshold) | (d > radius_mm**2)] = np.inf
    best = int(np.argmin(d))
    return None if np.isinf(d.flat[best]) else (float(best // saliency.shape[1]), float(best % saliency.shape[1]))


@pytest.mark.parametrize("pixel_mm", [(1.0, 1.0), (0.7, 1.3), (2.0, 0.5)])
def test_batched_nearest_salient_search_matches_a_search_of_every_pixel(pixel_mm):
    rng = np.random.default_rng(5)
    maps = (rng.random((6, 23, 31)) < 0.03).astype(np.float32)
    maps[2] = 0.0  # nothing salient
    maps[3] = rng.random((23, 31)).astype(np.float32)
    maps[4] = 0.0
    maps[4, [8, 12], 10] = 1.0  # as near to (10, 10) as each other: the first in row-major order wins
    centres = [(10.0, 10.0), (0.0, 0.0), (22.0, 30.0), (-1.5, 3.2), (24.2, 29.6), (-9.0, -9.0)]  # edges, off the slice
    centres += [(float(r), float(c)) for r, c in rng.uniform((-2, -2), (25, 33), (200, 2))]
    centres += [(float(r), float(c)) for r, c in rng.integers((0, 0), (23, 31), (60, 2))]
    slices = [4] + [int(n) for n in rng.integers(0, 6, len(centres) - 1)]
    distiller = ContextualPromptDistiller(pixel_mm)
    radius_mm = 4.0
    found = distiller._nearest_salient(torch.from_numpy(maps), slices, centres, radius_mm)
    expected = [nearest_by_brute_force(maps[n], c, pixel_mm, radius_mm, 0.5) for n, c in zip(slices, centres)]
    assert found == expected
    assert found[0] == (8.0, 10.0)
    assert sum(f is None for f in found) > 10 and sum(f is not None for f in found) > 50


def _on(device: str):
    return pytest.param(device, marks=pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(),
                                                         reason="needs CUDA"))


@pytest.mark.parametrize("device", [_on("cpu"), _on("cuda")])
def test_a_saliency_tensor_gives_what_the_numpy_map_gives(device):
    """Kept and moved clicks and snapped prompts alike, for the map as an array, a tensor, and a tensor laid out
    transposed in memory."""
    clicks = clicks_every(3, off_target_slice=14) + [SliceClick(5, 20.0, 40.0, False, 99)]
    r, c = target_centre(8)
    clicks[2] = SliceClick(8, r, c - 7.0, True, 2)
    maps = scene()
    distiller = ContextualPromptDistiller((0.9, 1.2))
    from_array = distiller.distill(clicks, maps, 0)
    transposed = torch.from_numpy(np.ascontiguousarray(maps.transpose(0, 2, 1))).transpose(1, 2)
    for saliency in (torch.from_numpy(maps), transposed):
        assert distiller.distill(clicks, saliency.to(device), 0) == from_array
    assert {d.status for d in from_array.decisions} >= {"kept", "moved"}
