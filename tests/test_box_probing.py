"""Box probing grows probe boxes until the decoder's mask stops changing."""

import numpy as np
import pytest
import torch

from scipy import ndimage

from lib.spd.method.box_probing import (ProbeConfig, areas, cover_salient_boxes, holds_point, mask_boxes,
                                        measure_anchor_boxes, padded_box, probe_anchor_masks, probe_centres)

SHAPE = (64, 64)


def probe_centre(saliency, point, pixel_mm, radius_mm, threshold):
    """:func:`probe_centres` of one slice."""
    return probe_centres(saliency[None], {7: point}, 7, pixel_mm, radius_mm, threshold)[7]


def cover_salient(box, saliency, point, pixel_mm, pad_mm, threshold):
    """:func:`cover_salient_boxes` of one slice."""
    return cover_salient_boxes({3: box}, saliency[None], {3: point}, 3, pixel_mm, pad_mm, threshold)[3]


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
def test_decoding_every_probe_at_once_takes_the_same_masks_in_one_call(band_slices, monkeypatch):
    decode, calls = touching_neighbour_decoder(band_slices)
    anchors = {s: (30.0, 30.0 + s) for s in range(5)}
    copies = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda tensor: copies.append(tensor.shape) or tolist(tensor))
    masks, typical = probe_anchor_masks(decode, anchors, (1.0, 1.0), SHAPE)
    assert len(calls) > 1, "level by level: the slices still open are decoded at the next size"
    assert len(copies) == len(calls), "what is decided comes to the host once per probe size"
    calls.clear()
    copies.clear()
    at_once, typical_at_once = probe_anchor_masks(decode, anchors, (1.0, 1.0), SHAPE, all_levels_at_once=True)
    assert calls == [[s for s in range(5) for _ in range(4)]], "every probe of every slice in one call"
    assert len(copies) == 1, "and what is decided on them comes to the host in one copy"
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


def scipy_probe_centre(saliency: np.ndarray, point, pixel_mm, radius_mm: float, threshold: float) -> np.ndarray:
    """The reference: probe_centre as it was, one slice at a time on the host with scipy."""
    pixel_mm = np.asarray(pixel_mm, dtype=float)
    r, c = (int(round(v)) for v in point)
    if not (0 <= r < saliency.shape[0] and 0 <= c < saliency.shape[1]):
        return np.asarray(point, dtype=float)
    reach = np.ceil(2 * radius_mm / pixel_mm).astype(int)
    r0, c0 = max(r - reach[0], 0), max(c - reach[1], 0)
    values = saliency[r0:r + reach[0] + 1, c0:c + reach[1] + 1]
    if values[r - r0, c - c0] < threshold:
        return np.asarray(point, dtype=float)
    labels, _ = ndimage.label(values >= threshold)
    region = labels == labels[r - r0, c - c0]
    depth = ndimage.distance_transform_edt(np.pad(region, 1), sampling=pixel_mm)[1:-1, 1:-1]
    rr, cc = np.indices(region.shape)
    near = np.hypot((rr + r0 - point[0]) * pixel_mm[0], (cc + c0 - point[1]) * pixel_mm[1]) <= radius_mm
    depth[~near] = -1
    best = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return np.array([best[0] + r0, best[1] + c0], dtype=float)


def scipy_cover_salient(box, saliency: np.ndarray, point, pixel_mm, pad_mm: float, threshold: float):
    """The reference: cover_salient as it was, one slice at a time on the host with scipy."""
    r, c = (int(round(v)) for v in point)
    if not (0 <= r < saliency.shape[0] and 0 <= c < saliency.shape[1]) or saliency[r, c] < threshold:
        return box
    labels, _ = ndimage.label(saliency >= threshold)
    region = padded_box(labels == labels[r, c], pad_mm / np.asarray(pixel_mm, dtype=float))
    return (min(box[0], region[0]), min(box[1], region[1]), max(box[2], region[2]), max(box[3], region[3]))


def random_saliency(rng, slices: int, shape=(40, 52)) -> np.ndarray:
    """Smooth random maps with plateaus (ties of depth) and speckle, float32 in [0, 1]."""
    smooth = ndimage.gaussian_filter(rng.random((slices, *shape)), (0, *rng.uniform(1.0, 3.0, 2)))
    maps = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    maps = np.where(rng.random(maps.shape) < 0.5, np.round(maps * 4) / 4, maps)  # plateaus
    maps[rng.random(maps.shape) < 0.03] = 0.0  # holes
    maps.flat[rng.integers(0, maps.size, 20)] = np.float32(0.7)  # on the threshold that float32 cannot hold
    return maps.astype(np.float32)


def random_points(rng, slices: int, shape, first: int) -> dict:
    """A point per slice: inside, near an edge, off the slice, on half pixels."""
    points = {}
    for s in range(first, first + slices):
        kind = rng.integers(4)
        if kind == 0:
            point = rng.uniform(-3, np.add(shape, 3))
        elif kind == 1:
            point = rng.integers(0, 2, 2) * (np.subtract(shape, 1)) + rng.uniform(-2, 2, 2)
        elif kind == 2:
            point = rng.integers(0, shape) + 0.5
        else:
            point = rng.uniform(0, np.subtract(shape, 1))
        points[s] = point
    return points


@pytest.mark.parametrize("seed", range(6))
def test_probe_centres_and_cover_salient_boxes_give_what_scipy_gave(seed):
    """Many random maps, anisotropic pixels, points off the slice, near its edge and not salient: the batched
    searches give exactly what scipy's labelling and distance transform gave, slice by slice."""
    rng = np.random.default_rng(seed)
    for _ in range(15):
        slices, first = int(rng.integers(1, 8)), int(rng.integers(0, 30))
        saliency = random_saliency(rng, slices)
        points = random_points(rng, slices, saliency.shape[1:], first)
        pixel_mm = tuple(rng.choice([0.45, 0.7, 0.9375, 1.0, 1.3], 2))
        radius_mm, threshold = float(rng.choice([0.0, 1.5, 3.0, 4.7])), float(rng.choice([0.3, 0.5, 0.7]))
        centres = probe_centres(torch.as_tensor(saliency), points, first, pixel_mm, radius_mm, threshold)
        for s, point in points.items():
            expected = scipy_probe_centre(saliency[s - first], point, pixel_mm, radius_mm, threshold)
            assert np.array_equal(centres[s], expected), (s, point, pixel_mm, radius_mm, threshold)
        boxes = {s: tuple(float(v) for v in np.sort(rng.uniform(0, 40, (2, 2)), 0).ravel()) for s in points}
        covered = cover_salient_boxes(boxes, saliency, points, first, pixel_mm, 2.0, threshold)
        assert covered == {s: scipy_cover_salient(boxes[s], saliency[s - first], points[s], pixel_mm, 2.0, threshold)
                           for s in points}


def test_the_pixel_under_the_point_is_compared_as_numpy_compared_one_value():
    """Saliency 0.7 in float32 is below 0.7 for one pixel's value (numpy compared it in float64) but reaches it
    across the slice (compared in float32)."""
    saliency = np.full((1, 20, 20), 0.7, dtype=np.float32)
    saliency[0, 12, 12] = 1.0
    for point in ((10.0, 10.0), (12.0, 12.0)):
        assert np.array_equal(probe_centres(saliency, {0: point}, 0, (1.0, 1.0), 3.0, 0.7)[0],
                              scipy_probe_centre(saliency[0], point, (1.0, 1.0), 3.0, 0.7))
        box = (11.0, 11.0, 13.0, 13.0)
        assert (cover_salient_boxes({0: box}, saliency, {0: point}, 0, (1.0, 1.0), 2.0, 0.7)[0]
                == scipy_cover_salient(box, saliency[0], point, (1.0, 1.0), 2.0, 0.7))
    box = (11.0, 11.0, 13.0, 13.0)
    assert cover_salient_boxes({0: box, 1: box}, np.concatenate([saliency] * 2), {0: (10.0, 10.0), 1: (12.0, 12.0)},
                               0, (1.0, 1.0), 2.0, 0.7) == {0: box, 1: (0.0, 0.0, 19.0, 19.0)}
