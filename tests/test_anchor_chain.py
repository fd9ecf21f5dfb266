"""Anchor masks are validated against the adjacent anchors: a run that took a neighbour is probed again."""

import numpy as np
import torch

from lib.spd.method.anchor_chain import AnchorChain, ChainConfig

SHAPE = (64, 64)
RR, CC = np.mgrid[: SHAPE[0], : SHAPE[1]]


def disc(centre, radius=6.0) -> np.ndarray:
    return (RR - centre[0]) ** 2 + (CC - centre[1]) ** 2 <= radius ** 2


def tube(s: int) -> tuple[float, float]:
    """The structure's centre on slice ``s``: it drifts one pixel every three slices."""
    return 20.0 + s / 3, 20.0


NEIGHBOUR = (20.0, 36.0)  # a touching structure of the same size beside it
AREA = float(disc((32, 32)).sum())  # the structure's steady size, in pixels


def structure_probes(calls: list):
    """Probes as SAM answers them: the disc of whichever structure holds the probe's centre, at three sizes
    (a fragment, the structure, the structure merged with its neighbour)."""
    def reprobe(s, centre):
        calls.append((s, tuple(np.round(centre))))
        own = tube(s) if np.hypot(*np.subtract(centre, tube(s))) < 8 else NEIGHBOUR
        return [disc(own, 3.0), disc(own), disc(own) | disc(NEIGHBOUR)], np.asarray(centre)
    return reprobe


def test_clean_anchors_are_left_as_they_are():
    masks = {s: disc(tube(s)) for s in range(0, 30, 3)}
    calls = []
    moved = AnchorChain(typical=AREA).follow(masks, structure_probes(calls))
    assert moved == {} and calls == []


def test_a_run_on_the_neighbour_or_merged_with_it_is_probed_again_where_the_chain_puts_the_structure():
    slices = list(range(0, 30, 3))
    masks = {s: disc(tube(s)) for s in slices}
    masks[21], masks[24] = disc(NEIGHBOUR), disc(tube(24)) | disc(NEIGHBOUR)  # drifted clicks at the far end
    masks[27] = disc(NEIGHBOUR)
    calls = []
    moved = AnchorChain(typical=AREA).follow(masks, structure_probes(calls))
    assert sorted(moved) == [21, 24, 27]
    assert [s for s, _ in calls] == [21, 24, 27], "only the anchors that do not link are probed, outward"
    assert all(moved[s][1] == s - 3 for s in moved), "each links to the trusted anchor before it"
    for s in slices:
        assert np.array_equal(masks[s], disc(tube(s))), s


def test_the_chain_grows_from_the_longest_run_in_both_directions():
    slices = list(range(0, 30, 3))
    masks = {s: disc(tube(s)) for s in slices}
    masks[0] = masks[3] = disc(NEIGHBOUR)
    calls = []
    moved = AnchorChain(typical=AREA).follow(masks, structure_probes(calls))
    assert [s for s, _ in calls] == [3, 0] and sorted(moved) == [0, 3]


def test_without_a_run_of_three_linked_anchors_nothing_is_trusted():
    masks = {0: disc(tube(0)), 3: disc(tube(3)), 6: disc(NEIGHBOUR), 9: disc((50, 50))}
    calls = []
    assert AnchorChain(typical=AREA).follow(masks, structure_probes(calls)) == {} and calls == []


def test_overlapping_masks_far_from_the_steady_size_do_not_link():
    """Masks that overlap but widen along the slices: only those near the structure's size link."""
    masks = {s: disc((30, 30), 4 + s) for s in range(6)}
    sized = AnchorChain(typical=float(disc((32, 32), 6).sum()), config=ChainConfig(size_ratio=1.5))
    assert [pair for pair, link in sized.adjacent_links(masks).items() if link is not None] == [(1, 2), (2, 3)]


def test_where_no_probe_mask_links_the_chain_ends_there():
    """Past an anchor that cannot be linked, the structure may have moved on: the anchors beyond keep their own
    masks instead of being judged by a distant trusted one."""
    slices = list(range(0, 30, 3))
    masks = {s: disc(tube(s)) for s in slices}
    masks[21], masks[27] = disc(NEIGHBOUR), disc(NEIGHBOUR)
    calls = []

    def nothing_links(s, centre):
        calls.append(s)
        return [disc((50, 50))], np.asarray(centre)

    assert AnchorChain(typical=AREA).follow(masks, nothing_links) == {}
    assert calls == [21], "the anchor after the break is not probed"
    assert np.array_equal(masks[27], disc(NEIGHBOUR))


def test_torch_masks_and_stacked_probes_move_the_anchors_numpy_masks_move():
    slices = list(range(0, 30, 3))
    masks = {s: disc(tube(s)) for s in slices}
    masks[0], masks[21], masks[24] = disc(NEIGHBOUR), disc(NEIGHBOUR), disc(tube(24)) | disc(NEIGHBOUR)
    on_torch = {s: torch.as_tensor(m) for s, m in masks.items()}
    calls, torch_calls = [], []
    numpy_probes, torch_probes = structure_probes(calls), structure_probes(torch_calls)

    def stacked(s, centre):
        found, point = torch_probes(s, centre)
        return torch.as_tensor(np.stack(found)), point

    moved = AnchorChain(typical=AREA).follow(masks, numpy_probes)
    assert sorted(moved) == [0, 21, 24]
    assert AnchorChain(typical=AREA).follow(on_torch, stacked).keys() == moved.keys() and torch_calls == calls
    assert all(torch.equal(on_torch[s], torch.as_tensor(masks[s])) for s in slices)


def test_links_of_adjacent_anchors_are_tested_again_only_after_an_anchor_moved(monkeypatch):
    """The longest run's search tests every adjacent pair at once; going outward, a pair is tested again only where
    the trusted anchor's mask was replaced (and the probes of a moved anchor are tested)."""
    slices = list(range(0, 30, 3))
    masks = {s: disc(tube(s)) for s in slices}
    masks[21], masks[24] = disc(NEIGHBOUR), disc(tube(24)) | disc(NEIGHBOUR)
    tested = []
    link_ious = AnchorChain.link_ious
    monkeypatch.setattr(AnchorChain, "link_ious", lambda self, a, b: tested.append(len(a)) or link_ious(self, a, b))
    moved = AnchorChain(typical=AREA).follow(masks, structure_probes([]))
    assert sorted(moved) == [21, 24]
    assert tested == [len(slices) - 1, 3, 1, 3, 1], "all pairs; 21's probes; 24 after 21 moved; 24's probes; 27"
