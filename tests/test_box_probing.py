"""Box probing grows probe boxes until the decoder's mask stops changing."""

import numpy as np
import pytest
import torch

from lib.spd.method.box_probing import (ProbeConfig, areas, cover_salient, holds_point, mask_boxes,
                                        measure_anchor_boxes, padded_box, probe_anchor_masks, probe_centre)

SHAPE = (64, 64)


def object_decoder(radius_by_slice, centre=(30, 30)):
    """A stand-in decoder: the object is a disc; the 'mask' is the part of it inside the box."""
    rr, cc = np.mgrid[: SHAPE[0], : SHAPE[1]]
    calls = []

    def decode(slices, boxes):
        calls.append(list(slices))
        out = []
        for s, (r0, c0, r1, c1) in zip(slices, boxes):
            disc = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius_by_slice[s] ** 2
            inside = (rr >= r0) & (rr <= r1) & (cc >= c0) & (cc <= c1)
            out.append(disc & inside)
        return np.array(out)

    return decode, calls


def test_box_fits_each_objects_extent():
    decode, calls = object_decoder({0: 3, 1: 9, 2: 15})
    config = ProbeConfig(half_sizes_mm=(5.0, 8.0, 12.0, 18.0), pad_mm=2.0)
    boxes = measure_anchor_boxes(decode, {s: (30.0, 30.0) for s in range(3)}, (1.0, 1.0), SHAPE, config)
    for s, radius in ((0, 3), (1, 9), (2, 15)):
        r0, c0, r1, c1 = boxes[s]
        assert abs((r1 - r0) - (2 * radius + 4)) <= 1, (s, boxes[s])
        assert abs((c0 + c1) / 2 - 30) <= 1
    assert calls[0] == calls[1] == [0, 1, 2] and 0 not in calls[2], "slices whose mask settled are not probed again"


def test_a_fragment_inside_a_too_small_box_is_not_taken_for_the_object():
    """A decoder that returns a blob well inside any box smaller than the object (as SAM can): the blob
    clears the box's border, but grows with the box, so it is not stable."""
    rr, cc = np.mgrid[: SHAPE[0], : SHAPE[1]]

    def decode(slices, boxes):
        out = []
        for r0, c0, r1, c1 in boxes:
            half = (r1 - r0) / 2
            radius = 0.4 * half if half < 10 else 9  # a fragment for small boxes, the whole object (r=9) otherwise
            out.append((rr - 30) ** 2 + (cc - 30) ** 2 <= radius**2)
        return np.array(out)

    boxes = measure_anchor_boxes(decode, {0: (30.0, 30.0)}, (1.0, 1.0), SHAPE)
    r0, _, r1, _ = boxes[0]
    assert r1 - r0 >= 18


def test_object_larger_than_every_probe_uses_the_largest():
    decode, _ = object_decoder({0: 40})
    boxes = measure_anchor_boxes(decode, {0: (30.0, 30.0)}, (1.0, 1.0), SHAPE, ProbeConfig(half_sizes_mm=(4.0, 8.0)))
    r0, _, r1, _ = boxes[0]
    assert r1 - r0 >= 16


def touching_neighbour_decoder(band_slices):
    """A disc (radius 8: about 200 px) clipped to the box; on ``band_slices`` the click lies where the structure
    touches a neighbour that runs on past every probe, so each larger box takes in more of it."""
    rr, cc = np.mgrid[: SHAPE[0], : SHAPE[1]]
    disc = (rr - 30) ** 2 + (cc - 30) ** 2 <= 64
    band = (rr >= 24) & (rr <= 35)  # touching neighbours: 12 rows high, across the whole slice
    calls = []

    def decode(slices, boxes):
        calls.append(list(slices))
        out = []
        for s, (r0, c0, r1, c1) in zip(slices, boxes):
            inside = (rr >= r0) & (rr <= r1) & (cc >= c0) & (cc <= c1)
            out.append((band if s in band_slices else disc) & inside)
        return np.array(out)

    return decode, calls


def test_where_the_probes_never_agree_the_mask_of_the_structures_settled_size_is_taken():
    """On slices 0-2 the probes settle on the disc; on slice 3 they never agree."""
    decode, _ = touching_neighbour_decoder({3})
    boxes = measure_anchor_boxes(decode, {s: (30.0, 30.0) for s in range(4)}, (1.0, 1.0), SHAPE)
    widths = {s: boxes[s][3] - boxes[s][1] for s in boxes}
    assert all(abs(widths[s] - 20) <= 1 for s in range(3)), widths
    assert widths[3] <= 21, "the probe whose mask has about the settled area (17 px wide), not a wider one"
    alone = measure_anchor_boxes(decode, {3: (30.0, 30.0)}, (1.0, 1.0), SHAPE)
    assert alone[3][3] - alone[3][1] > 21, "with no settled slice to compare, the most stable pair decides"


def test_probes_are_centred_on_the_deepest_salient_pixel_near_the_point():
    rr, cc = np.mgrid[: SHAPE[0], : SHAPE[1]]
    saliency = ((rr - 30) ** 2 + (cc - 30) ** 2 <= 49).astype(np.float32)  # a disc of radius 7 px
    saliency[(rr - 30) ** 2 + (cc - 46) ** 2 <= 49] = 1.0  # a touching-distance neighbour, 16 px away
    near_edge = probe_centre(saliency, (30.0, 25.0), (1.0, 1.0), 6.0, 0.5)
    assert np.allclose(near_edge, (30, 30)), "a point near the disc's edge moves to its centre"
    short = probe_centre(saliency, (30.0, 25.0), (1.0, 1.0), 3.0, 0.5)
    assert np.hypot(*(short - (30, 25))) <= 3.0 and short[1] > 25, "never further than the radius"
    assert np.allclose(probe_centre(saliency, (30.0, 36.0), (1.0, 1.0), 6.0, 0.5), (30, 30)), \
        "the region under the point, not the neighbour"
    assert np.allclose(probe_centre(saliency, (10.0, 10.0), (1.0, 1.0), 6.0, 0.5), (10, 10)), "not salient: kept"
    assert np.allclose(probe_centre(saliency, (30.0, 25.0), (1.0, 1.0), 0.0, 0.5), (30, 25))


def test_a_box_grows_to_the_salient_region_under_its_point_and_no_further():
    saliency = np.zeros((60, 60), dtype=np.float32)
    saliency[20:41, 10:31] = 0.9  # the structure as a trained head sees it
    saliency[45:55, 40:50] = 0.9  # another salient region, not under the point
    small = (25.0, 15.0, 35.0, 25.0)  # a probe mask's box that stopped short
    assert cover_salient(small, saliency, (30, 20), (1.0, 1.0), 2.0, 0.5) == (18.0, 8.0, 42.0, 32.0)
    assert cover_salient(small, saliency, (30, 20), (1.0, 2.0), 2.0, 0.5) == (18.0, 9.0, 42.0, 31.0), "pad in mm"
    large = (5.0, 5.0, 50.0, 50.0)
    assert cover_salient(large, saliency, (30, 20), (1.0, 1.0), 2.0, 0.5) == large, "never shrinks"
    assert cover_salient(small, saliency, (30, 35), (1.0, 1.0), 2.0, 0.5) == small, "a point off the salient region"


def test_padded_box_grows_the_masks_extent_and_stays_on_the_slice():
    mask = np.zeros((20, 30), dtype=bool)
    mask[1:6, 10:25] = True
    assert padded_box(mask, (2.0, 3.0)) == (0.0, 7.0, 7.0, 27.0)
    assert padded_box(mask, (0.5, 1.0, 1.5, 9.0)) == (0.5, 9.0, 6.5, 29.0)


@pytest.mark.parametrize("band_slices", [{3}, {1, 3, 4}], ids=["steady size", "no steady size"])
def test_decoding_every_probe_at_once_takes_the_same_masks_in_one_call(band_slices):
    decode, calls = touching_neighbour_decoder(band_slices)
    anchors = {s: (30.0, 30.0 + s) for s in range(5)}
    masks, typical = probe_anchor_masks(decode, anchors, (1.0, 1.0), SHAPE)
    assert len(calls) > 1, "level by level: the slices still open are decoded at the next size"
    calls.clear()
    at_once, typical_at_once = probe_anchor_masks(decode, anchors, (1.0, 1.0), SHAPE, all_levels_at_once=True)
    assert calls == [[s for s in range(5) for _ in range(4)]], "every probe of every slice in one call"
    assert typical_at_once == typical and (typical is None) == (band_slices == {1, 3, 4})
    assert list(at_once) == list(masks) and all(torch.equal(at_once[s], masks[s]) for s in masks)
    assert (mask_boxes(at_once, anchors, (1.0, 1.0), SHAPE)
            == measure_anchor_boxes(decode, anchors, (1.0, 1.0), SHAPE, all_levels_at_once=True)
            == measure_anchor_boxes(decode, anchors, (1.0, 1.0), SHAPE))


def test_torch_masks_on_the_decoders_device_give_what_numpy_masks_give():
    decode, _ = touching_neighbour_decoder({3})
    anchors = {s: (30.0, 30.0) for s in range(4)}
    from_numpy, typical = probe_anchor_masks(decode, anchors, (0.7, 1.3), SHAPE)
    from_torch, typical_torch = probe_anchor_masks(lambda s, b: torch.as_tensor(decode(s, b)), anchors, (0.7, 1.3),
                                                   SHAPE)
    assert typical_torch == typical and all(torch.equal(from_torch[s], from_numpy[s]) for s in anchors)
    assert all(isinstance(m, torch.Tensor) for m in from_numpy.values()), "the masks are tensors either way"
    numpy_masks = {s: m.numpy() for s, m in from_torch.items()}
    assert mask_boxes(numpy_masks, anchors, (0.7, 1.3), SHAPE) == mask_boxes(from_torch, anchors, (0.7, 1.3), SHAPE)

    stack = torch.stack(list(from_torch.values()))
    assert holds_point(stack, [(30.0, 30.0), (30.0, 30.0), (5.0, 5.0), (-1.0, 30.0)]).tolist() == [
        True, True, False, False]
    assert areas(stack).tolist() == [int(m.sum()) for m in numpy_masks.values()]
    mask = np.zeros((20, 30), dtype=bool)
    mask[1:6, 10:25] = True
    assert padded_box(torch.as_tensor(mask), (2.0, 3.0)) == padded_box(mask, (2.0, 3.0))
    saliency = np.zeros((60, 60), dtype=np.float32)
    saliency[20:41, 10:31] = 0.9
    for point in ((30.0, 20.0), (22.0, 12.0), (50.0, 50.0)):
        assert np.array_equal(probe_centre(torch.as_tensor(saliency), point, (1.0, 1.0), 6.0, 0.5),
                              probe_centre(saliency, point, (1.0, 1.0), 6.0, 0.5))
        assert (cover_salient((25.0, 15.0, 35.0, 25.0), torch.as_tensor(saliency), point, (1.0, 2.0), 2.0, 0.5)
                == cover_salient((25.0, 15.0, 35.0, 25.0), saliency, point, (1.0, 2.0), 2.0, 0.5))
