"""Integration: a real MONAI Label server driven with monailabel.client, as the Slicer plugin drives it."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import local_server
import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from scipy import ndimage

from lib.spd.method.prompts import medial_point
from lib.spd.training import ClickStyle, simulate_clicks
from lib.volume_io import volume_id

LABELS = json.loads((__import__("pathlib").Path(__file__).resolve().parents[1] / "apps/spd_sam/labels.json").read_text())
IMAGE = "colin27_t1"


@pytest.fixture(scope="module")
def client(server, tmp_path_factory) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("client")))


@pytest.fixture(scope="module")
def atlas(server):
    return np.asarray(nib.load(server.studies / "labels" / "final" / f"{IMAGE}.nii.gz").dataobj)


@pytest.fixture(scope="module")
def caudate_clicks(atlas):
    """Seven rough clicks along the right caudate (axial slices, every 6th), one of them on the putamen."""
    target = atlas == LABELS["right_caudate"]
    clicks, _ = simulate_clicks(target, (1, 1, 1), axis=2, style=ClickStyle(every=6, drift_mm=2.0, off_target=0.0),
                                rng=np.random.default_rng(7))
    putamen = np.argwhere((atlas == LABELS["right_putamen"])[:, :, clicks[3][2]])
    clicks[3] = [int(putamen[len(putamen) // 2][0]), int(putamen[len(putamen) // 2][1]), clicks[3][2]]
    assert 5 <= len(clicks) <= 8
    return clicks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_info_lists_spd_sam_as_a_3d_deepgrow_model(client):
    info = client.info()
    model = info["models"]["spd_sam"]
    assert model["type"] == "deepgrow" and model["dimension"] == 3
    assert model["labels"]["right_caudate"] == LABELS["right_caudate"]
    cache = info["embedding_cache"]
    assert cache["disk_budget_bytes"] == 20480 << 20 and 0 <= cache["disk_bytes"] <= cache["disk_budget_bytes"]


def test_rough_clicks_segment_the_right_caudate(client, atlas, caudate_clicks):
    params = {"label": "right_caudate", "foreground": caudate_clicks, "background": []}
    result_file, result = client.infer("spd_sam", IMAGE, params)
    mask = np.asarray(nib.load(result_file).dataobj)
    truth = atlas == LABELS["right_caudate"]
    assert mask.shape == truth.shape
    assert set(np.unique(mask)) <= {0, LABELS["right_caudate"]}
    score = dice(mask > 0, truth)
    print(f"right caudate Dice {score:.3f}; timing {result['timing']}")
    assert score >= 0.5
    assert result["label_names"] == {"right_caudate": LABELS["right_caudate"]}
    consensus = result["consensus"]
    handled = {c["click"]: c["status"] for status in ("kept", "moved", "rejected") for c in consensus[status]}
    assert sorted(handled) == list(range(len(caudate_clicks)))
    assert handled[3] in ("moved", "rejected"), "the click on the putamen must not be kept as given"
    assert consensus["added"], "slices between clicks get prompts"
    first, last = result["slice_range"]
    assert first <= min(c[2] for c in caudate_clicks) and last >= max(c[2] for c in caudate_clicks)
    scores = result["predicted_iou"]  # the caudate is small on its slices: a square around it is tried
    assert {"whole slices", "focus square", "served"} <= set(scores)
    bounds = result["focus"]  # the square's block, or None where the decoder trusts whole slices more
    assert (bounds is None) == (scores["whole slices"] > scores["focus square"])
    if bounds is not None:
        assert bounds[2] == [first, last]
        assert all(lo <= v <= hi for (lo, hi), v in zip(bounds, np.argwhere(mask).min(axis=0)))
        assert all(lo <= v <= hi for (lo, hi), v in zip(bounds, np.argwhere(mask).max(axis=0)))
    assert result["backbone"]["name"] == "lite_medsam"
    assert {"embed", "decode", "total"} <= set(result["timing"])


def test_a_draft_asked_for_comes_quickly_and_the_same_request_later_gets_the_full_result(server, atlas):
    """Coronal clicks (an axis nothing has embedded yet) with ``draft``: the clicked slices alone are segmented,
    the slices between filled; the rest embeds in the background, and the same request then runs in full."""
    truth, client = atlas == LABELS["right_caudate"], _annotator(server, "draft")
    clicks, _ = simulate_clicks(truth, (1, 1, 1), axis=1, style=ClickStyle(every=3, drift_mm=1.0, off_target=0.0),
                                rng=np.random.default_rng(3))
    clicks = sorted(clicks, key=lambda c: c[1])[len(clicks) // 2 - 2:][:5]
    first, last = clicks[0][1], clicks[-1][1]
    params = {"label": "right_caudate", "foreground": clicks, "background": [], "slice_axis": 1, "draft": True}
    drafted, result = _mask(client, IMAGE, params)
    print(f"draft: {result['draft']}, {result['timing']['total']:.1f} s")
    assert result["draft"]["slices_segmented"] == 5 and result["draft"]["slices_filled"] == last - first + 1 - 5
    assert result["draft"]["slices_to_embed"] >= 8 and result["slice_range"] == [first, last]
    assert all(drafted[:, s].any() for s in range(first, last + 1)), "the slices between clicks are filled"
    assert dice(drafted[:, first:last + 1], truth[:, first:last + 1]) > 0.5

    started, full = time.monotonic(), result
    while full["draft"] is not None and time.monotonic() - started < 300:
        time.sleep(3)
        refined, full = _mask(client, IMAGE, params)
    print(f"full result {time.monotonic() - started:.0f} s later: slices {full['slice_range']}, "
          f"Dice to the draft {dice(refined, drafted):.3f}")
    assert full["draft"] is None and full["interaction"]["mode"] == "new"
    assert full["slice_range"][0] < first and full["slice_range"][1] > last, "half a click gap each side"
    assert dice(refined[:, first:last + 1], truth[:, first:last + 1]) > 0.5 and dice(refined, drafted) > 0.7


def test_ohif_style_request_gets_uncompressed_nrrd(client, caudate_clicks, server):
    params = {"foreground": caudate_clicks, "background": [], "result_extension": ".nrrd",
              "result_dtype": "uint8", "result_compress": False}
    result_file, result = client.infer("spd_sam", IMAGE, params)
    assert result_file.endswith(".nrrd")
    image = sitk.ReadImage(result_file)
    reference = sitk.ReadImage(str(server.studies / f"{IMAGE}.nii.gz"))
    assert image.GetSize() == reference.GetSize()
    assert np.allclose(image.GetOrigin(), reference.GetOrigin()) and np.allclose(image.GetDirection(), reference.GetDirection())
    assert sitk.GetArrayViewFromImage(image).dtype == np.uint8 and sitk.GetArrayViewFromImage(image).max() == 1
    assert b"encoding: raw" in open(result_file, "rb").read(1000)


def test_a_client_saving_results_in_the_system_temp_folder_keeps_them(server, caudate_clicks):
    """MONAILabelClient's default saves a result under its own name in the system temp folder, the server's own
    on one machine; the server, which deletes its copy right after sending it, must not be deleting the client's."""
    server_temp = str(server.log.parent / "tmp")  # the server's TMPDIR (local_server.start)
    client = MONAILabelClient(server.url, tmpdir=server_temp)
    result_file, _ = client.infer("spd_sam", IMAGE, {"foreground": caudate_clicks, "background": []})
    try:
        assert os.path.dirname(result_file) == server_temp
        time.sleep(1.0)  # time for the server's clean-up after the response
        assert os.path.exists(result_file), "the server deleted the client's copy of the result"
        assert (np.asarray(nib.load(result_file).dataobj) > 0).any()
    finally:
        if os.path.exists(result_file):
            os.unlink(result_file)


# Corrective clicks, sent as the Slicer panel sends them: every point of the segment with each run.

def _annotator(server, name: str) -> MONAILabelClient:
    """A client of its own (the client id keys the server's interaction sessions, as each Slicer has its own),
    saving its results beside the server's log (pytest's folder, not the system temp folder)."""
    folder = server.log.parent / "clients" / name
    folder.mkdir(parents=True, exist_ok=True)
    return MONAILabelClient(server.url, tmpdir=str(folder), client_id=name)


def _mask(client, image, params) -> tuple[np.ndarray, dict]:
    result_file, result = client.infer("spd_sam", image, params)
    return np.asarray(nib.load(result_file).dataobj) > 0, result


def _largest_part(region: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(region)
    assert count, "the region is empty"
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def _deepest(region: np.ndarray) -> list[int]:
    return [int(v) for v in np.unravel_index(np.argmax(ndimage.distance_transform_edt(region)), region.shape)]


def test_a_negative_click_on_a_leak_removes_it_there_and_on_its_neighbours_only(server, atlas, caudate_clicks):
    truth, client = atlas == LABELS["right_caudate"], _annotator(server, "negative")
    params = {"label": "right_caudate", "foreground": caudate_clicks, "background": []}
    before, first = _mask(client, IMAGE, params)
    assert first["interaction"]["mode"] == "new"
    leak = _largest_part(ndimage.binary_opening(before & ~truth))  # a leak, not the boundary's one-voxel rim
    click = _deepest(leak)
    after, result = _mask(client, IMAGE, dict(params, background=[click]))
    removed = before & ~after
    record = result["interaction"]
    print(f"leak of {leak.sum()} voxels on slices {np.flatnonzero(leak.any((0, 1)))}; removed {removed.sum()} on "
          f"{np.flatnonzero(removed.any((0, 1)))}; Dice {dice(before, truth):.3f} -> {dice(after, truth):.3f}; "
          f"{result['timing']['total']:.2f} s")
    assert record["mode"] == "correction" and record["step"] == 1 and record["clicks"] == len(caudate_clicks) + 1
    assert not after[tuple(click)] and not (after & ~before).any()
    assert (removed & ~truth).sum() >= 0.6 * removed.sum(), "what goes is not the structure"
    assert (removed & leak).sum() >= 0.3 * leak.sum(), "a good part of the leak goes"
    k = click[2]
    leak_slices = set(np.flatnonzero(leak.any((0, 1))))
    neighbours = {k - 1, k + 1} & leak_slices
    assert neighbours and all(removed[:, :, s].any() for s in neighbours), "the leak goes where it continues"
    changed = np.flatnonzero(removed.any((0, 1)))
    far = np.abs(np.arange(truth.shape[2]) - k) > 12  # two gaps of the annotator's clicks (every 6th slice)
    assert np.array_equal(after[:, :, far], before[:, :, far]), "distant slices are untouched"
    assert record["voxels_removed"] == removed.sum() and record["voxels_added"] == 0
    assert record["slices_changed"] == [int(changed[0]), int(changed[-1])]
    assert dice(after, truth) > dice(before, truth)
    again, repeat = _mask(client, IMAGE, dict(params, background=[click]))
    assert repeat["interaction"]["mode"] == "unchanged" and np.array_equal(again, after)


def test_a_positive_click_past_the_end_extends_the_mask_and_a_new_click_list_starts_afresh(server, atlas,
                                                                                          caudate_clicks):
    truth, client = atlas == LABELS["right_caudate"], _annotator(server, "positive")
    short = sorted(caudate_clicks, key=lambda c: c[2])[:-2]  # the annotator has not reached the upper end yet
    params = {"label": "right_caudate", "foreground": short, "background": []}
    before, first = _mask(client, IMAGE, params)
    assert first["interaction"]["mode"] == "new"
    top = int(np.flatnonzero(before.any((0, 1)))[-1])
    k = top + 4
    assert truth[:, :, k].any()
    click = [*medial_point(truth[:, :, k]), k]
    after, result = _mask(client, IMAGE, dict(params, foreground=short + [click]))
    record = result["interaction"]
    print(f"mask ended on slice {top}, click on {k}: slices now up to {np.flatnonzero(after.any((0, 1)))[-1]}; "
          f"+{record['voxels_added']} voxels; Dice {dice(before, truth):.3f} -> {dice(after, truth):.3f}; "
          f"{result['timing']['total']:.2f} s")
    assert record["mode"] == "correction" and record["voxels_added"] > 0 and record["voxels_removed"] == 0
    assert after[tuple(click)] and all(after[:, :, s].any() for s in range(top + 1, k + 1)), "extended to the click"
    assert not (before & ~after).any() and dice(after, truth) > dice(before, truth)
    _, restart = _mask(client, IMAGE, dict(params, foreground=short[1:] + [click]))
    assert restart["interaction"]["mode"] == "new", "a click taken away starts a new session"


def test_slicers_roi_alone_is_a_box_prompt(server, atlas):
    truth = atlas == LABELS["right_caudate"]
    k = int(np.argmax(truth.sum(axis=(0, 1))))
    rows, cols = np.nonzero(truth[:, :, k])
    roi = [[int(rows.min()) - 2, int(rows.max()) + 2], [int(cols.min()) - 2, int(cols.max()) + 2], [k, k]]
    mask, result = _mask(_annotator(server, "box"), IMAGE, {"label": "right_caudate", "roi": roi})
    span = np.flatnonzero(mask.any((0, 1)))
    print(f"box on slice {k}: slices {span[0]}..{span[-1]} (truth {np.flatnonzero(truth.any((0, 1)))[[0, -1]]}); "
          f"Dice on the slice {dice(mask[:, :, k], truth[:, :, k]):.3f}, in 3D {dice(mask, truth):.3f}")
    assert result["interaction"]["mode"] == "new" and result["slice_axis"] == 2
    assert dice(mask[:, :, k], truth[:, :, k]) > 0.6
    assert span[0] < k - 2 and span[-1] > k + 2, "followed onto the adjacent slices"
    assert dice(mask, truth) > 0.3


def test_two_clients_on_two_images_correct_their_own_sessions(server, caudate_clicks):
    def annotate(client_id: str, image: str, clicks: list, out: dict) -> None:
        client = _annotator(server, client_id)
        params = {"label": "right_caudate", "foreground": clicks, "background": []}
        first, one = _mask(client, image, params)
        inside = np.argwhere(first)  # a negative click on the voxel of the mask farthest from the clicks
        negative = [int(v) for v in inside[np.argmax(np.abs(inside - clicks[1]).sum(axis=1))]]
        corrected, two = _mask(client, image, dict(params, background=[negative]))
        again, three = _mask(client, image, dict(params, background=[negative]))
        out[client_id] = ([r["interaction"]["mode"] for r in (one, two, three)], two["interaction"],
                          np.array_equal(again, corrected))

    results: dict = {}
    i, j, k = caudate_clicks[1]
    mni_clicks = [[i + 8, j + 8, k + 4], [i + 8, j + 9, k + 7]]  # two clicks three slices apart: little to embed
    threads = [threading.Thread(target=annotate, args=("annotator-a", IMAGE, caudate_clicks[1:5], results)),
               threading.Thread(target=annotate, args=("annotator-b", "mni152_t1", mni_clicks, results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for name, (modes, correction, repeatable) in results.items():
        print(f"{name}: {modes}; {correction['voxels_removed']} voxels removed on slices {correction['slices_changed']}")
        assert modes == ["new", "correction", "unchanged"] and correction["step"] == 1 and repeatable
    assert len(results) == 2


@pytest.mark.parametrize(
    "image, params, status, words",
    [
        (IMAGE, {"foreground": [[500, 10, 10]]}, 400, "outside the image"),
        (IMAGE, {"foreground": [10, 10, 10]}, 400, "list of three"),
        (IMAGE, {"foreground": [[10, "x", 10]]}, 400, "non-numeric"),
        (IMAGE, {"foreground": []}, 400, "at least one foreground"),
        (IMAGE, {"foreground": [[90, 140, 80]], "label": "spleen"}, 400, "unknown label"),
        (IMAGE, {"foreground": [[90, 140, 80]], "slice_axis": 5}, 400, "slice_axis"),
        (IMAGE, {"foreground": [[90, 140, 80]], "result_extension": ".exe"}, 400, "result_extension"),
        (IMAGE, {"foreground": [[90, 140, 80]], "focus": "sometimes"}, 400, "focus must be true or false"),
        (IMAGE, {"foreground": [[90, 140, 80]], "draft": "maybe"}, 400, "draft must be true or false"),
        ("no_such_image", {"foreground": [[1, 1, 1]]}, 404, "unknown image"),
        ("../../etc/passwd", {"foreground": [[1, 1, 1]]}, 400, "invalid image id"),
        ("/etc/passwd", {"foreground": [[1, 1, 1]]}, 400, "invalid image id"),
    ],
)
def test_malformed_requests_get_4xx_with_a_message(server, image, params, status, words):
    response = requests.post(f"{server.url}/infer/spd_sam", params={"image": image},
                             data={"params": json.dumps(params)}, timeout=60)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


@pytest.mark.parametrize(
    "query, form, words",
    [
        ({"image": IMAGE}, {"params": "{not json"}, "params must be a JSON object"),
        ({"image": IMAGE}, {"params": "[[90, 140, 80]]"}, "got a JSON list"),
        ({}, {"params": "{}"}, "an image id"),
        ({"image": ""}, {"params": "{}"}, "an image id"),
    ],
)
def test_requests_monai_labels_route_would_fail_with_a_500_get_a_400(server, query, form, words):
    response = requests.post(f"{server.url}/infer/spd_sam", params=query, data=form, timeout=60)
    assert response.status_code == 400, response.text
    assert words in response.json()["detail"]


def test_unknown_model_is_404_and_server_keeps_serving(server, client):
    response = requests.post(f"{server.url}/infer/nope", params={"image": IMAGE},
                             data={"params": json.dumps({"foreground": [[1, 1, 1]]})}, timeout=60)
    assert response.status_code == 404 and "unknown model" in response.json()["detail"]
    with pytest.raises(MONAILabelClientException):
        client.infer("spd_sam", IMAGE, {"foreground": [[999, 0, 0]]})
    assert client.info()["models"]["spd_sam"]["type"] == "deepgrow"


def test_opening_an_image_in_a_viewer_starts_embedding_it(server):
    """Slicer downloads the image it opens; its slices are embedded before the first click comes."""
    image = "invesalius_head_ct"  # not the image next_sample("first") proposes below
    prefix = volume_id(str(server.studies / f"{image}.nii.gz"))
    cache = server.log.parent / "cache" / "spd_embeddings"
    response = requests.get(f"{server.url}/datastore/image", params={"image": image}, timeout=60)
    assert response.status_code == 200 and response.content
    deadline = time.monotonic() + 60
    while not (cache.is_dir() and any(cache.glob(f"{prefix}-*/*.npy"))):
        assert time.monotonic() < deadline, f"no embedding of {image} appeared in {cache} after its download"
        time.sleep(0.5)


def test_next_sample_starts_background_embedding(server, client):
    cache = server.log.parent / "cache" / "spd_embeddings"
    before = {p.name for p in cache.iterdir()} if cache.is_dir() else set()
    sample = client.next_sample("first", {})
    assert sample["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = {p.name for p in cache.iterdir()} - before if cache.is_dir() else set()
        if any(list((cache / n).glob("*.npy")) for n in new):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no background embedding appeared in {cache} after next_sample({sample['id']})")


def test_unknown_strategy_is_404(server):
    response = requests.post(f"{server.url}/activelearning/nope", json={}, timeout=30)
    assert response.status_code == 404 and "unknown strategy" in response.json()["detail"]


def _put_label(server, image: str, tag: str, payload: bytes, name: str = "label.nii.gz") -> requests.Response:
    return requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": tag},
                        files={"label": (name, payload)}, data={"params": "{}"}, timeout=60)


def _nifti_bytes(array: np.ndarray, path) -> bytes:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path.read_bytes()


@pytest.mark.parametrize("case, status, words", [
    ("wrong shape", 400, "differs from the image"),
    ("truncated gzip", 400, "unreadable"),
    ("not an image", 400, "unreadable"),
    ("4D", 400, "3D scalar"),
    ("path-like tag", 400, "invalid label tag"),
    ("unknown image", 404, "unknown image"),
])
def test_bad_label_uploads_get_4xx_and_the_saved_label_is_unchanged(server, atlas, tmp_path, case, status, words):
    final = server.studies / "labels" / "final" / f"{IMAGE}.nii.gz"
    before = final.read_bytes()
    good = _nifti_bytes(atlas.astype(np.uint8), tmp_path / "good.nii.gz")
    image, tag, payload = IMAGE, "final", good
    if case == "wrong shape":
        payload = _nifti_bytes(atlas[:-1].astype(np.uint8), tmp_path / "small.nii.gz")
    elif case == "truncated gzip":
        payload = good[: len(good) // 2]
    elif case == "not an image":
        payload = b"not a label volume"
    elif case == "4D":
        payload = _nifti_bytes(np.zeros((*atlas.shape[:2], 4, 2), np.uint8), tmp_path / "four_d.nii.gz")
    elif case == "path-like tag":
        tag = "../../outside"
    elif case == "unknown image":
        image = "no_such_image"
    response = _put_label(server, image, tag, payload)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert final.read_bytes() == before, "the final label on disk is untouched"
    assert not list(server.studies.parent.glob("outside*")) and not (server.studies / "outside").exists()
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


def test_a_good_label_upload_is_saved(server, atlas, tmp_path):
    label = atlas.copy()
    label[label != LABELS["right_caudate"]] = 0
    payload = _nifti_bytes(label.astype(np.uint8), tmp_path / "caudate.nii.gz")
    response = _put_label(server, IMAGE, "original", payload)
    assert response.status_code == 200, response.text
    saved = server.studies / "labels" / "original" / f"{IMAGE}.nii.gz"
    assert np.array_equal(np.asarray(nib.load(saved).dataobj), label)


def test_concurrent_clients_mixing_infers_and_saves(server, caudate_clicks, tmp_path):
    """A short version of scripts/soak.py: 4 clients x 4 requests on the server the module started, re-clicks
    along the right caudate (embedded by the tests above)."""
    from soak import Target, run_soak

    targets = [Target(IMAGE, "right_caudate", caudate_clicks)]
    report = run_soak(server.url, targets, clients=4, requests_each=4, save_every=2, workdir=tmp_path, train=None,
                      server_pid=server.process.pid)
    print("\n".join(report.lines()))
    assert not report.errors
    assert len(report.latencies["infer"]) == 4 * 2 and len(report.latencies["save"]) == 4 * 2
    growth_mib = (report.rss_peak - report.rss_start) / 2**20
    assert growth_mib < 2048, "the server grew beyond its embedding-cache budget"
    saved = server.studies / "labels" / "soak" / f"{IMAGE}.nii.gz"
    assert nib.load(saved).shape == nib.load(server.studies / f"{IMAGE}.nii.gz").shape


# Unusual volumes uploaded through the datastore (they run last: the 2,000-slice volume leaves the server
# embedding its remaining slices in the background).

def _rotation(degrees_x: float, degrees_y: float) -> np.ndarray:
    ax, ay = np.radians(degrees_x), np.radians(degrees_y)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return ry @ rx


def _edge_volume(case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]]]:
    """(image, affine, painted structure, foreground clicks): a bright ellipsoid in a noisy volume.

    The 2,000-slice volume is a CT (a body in air, in HU): an MR-like volume of flat noise that long
    would get a percentile window from noise alone (the structure is 0.03 % of its voxels).
    """
    if case == "one slice":
        shape, spacing, centre, radii, click_slices = (64, 64, 1), (0.8, 0.8, 3.0), (30, 34, 0), (11, 8, 1), [0, 0]
    elif case == "2000 slices":
        shape, spacing, centre, radii = (48, 48, 2000), (1.0, 1.0, 1.0), (22, 25, 1200), (9, 7, 4)
        click_slices = [1199, 1201]
    else:  # oblique: rotated 25 and 20 degrees about two axes, anisotropic voxels
        shape, spacing, centre, radii, click_slices = (48, 40, 12), (0.9, 1.1, 2.0), (22, 20, 6), (10, 8, 3), [5, 6]
    grid = np.indices(shape, dtype=np.float32)
    structure = sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0
    noise = np.random.default_rng(3).standard_normal(shape)
    if case == "2000 slices":
        body = (grid[0] - shape[0] / 2) ** 2 + (grid[1] - shape[1] / 2) ** 2 <= (0.45 * shape[0]) ** 2
        image = (np.where(body, 40, -1000) + 10 * noise + 160 * structure).astype(np.int16)
    else:
        image = (100 + 8 * noise + 300 * structure).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-20.0, 35.0, -60.0)
    if case == "oblique":
        affine[:3, :3] = _rotation(25.0, 20.0) @ np.diag(spacing)
    step = 4 if case == "one slice" else 1  # two clicks in the one slice spread in-plane
    clicks = [[centre[0] + d, centre[1] - d, k] for d, k in zip((0, step), click_slices)]
    assert all(structure[tuple(c)] for c in clicks)
    return image, affine, structure, clicks


@pytest.mark.parametrize("case", ["one slice", "oblique", "2000 slices"])
def test_unusual_volumes_upload_and_segment(server, client, tmp_path, case):
    """Uploaded like Slicer's "upload volume", then segmented from two clicks: the label has the image's
    grid and geometry and covers the painted structure on the slices segmented."""
    image, affine, structure, clicks = _edge_volume(case)
    image_id = "edge_" + case.replace(" ", "_")
    path = tmp_path / f"{image_id}.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), path)
    assert client.upload_image(str(path), image_id)["image"] == image_id
    started = time.monotonic()
    result_file, result = client.infer("spd_sam", image_id, {"foreground": clicks, "background": []})
    elapsed = time.monotonic() - started
    label = nib.load(result_file)
    mask = np.asarray(label.dataobj) > 0
    assert mask.shape == image.shape
    assert np.allclose(label.affine, affine, atol=1e-4), f"result geometry {label.affine} != image {affine}"
    first, last = result["slice_range"]
    assert result["slice_axis"] == 2, "the single slice, or the axis the clicks run along"
    assert first <= min(c[2] for c in clicks) and last >= max(c[2] for c in clicks) and last - first <= 8
    segmented = np.zeros_like(structure)
    segmented[:, :, first:last + 1] = structure[:, :, first:last + 1]
    score = dice(mask, segmented)
    print(f"{case}: Dice {score:.3f} on slices {first}..{last}; {elapsed:.1f}s; timing {result['timing']}")
    assert score >= 0.75
    if case == "one slice":  # slices across the single slice would be one voxel wide
        response = requests.post(f"{server.url}/infer/spd_sam", params={"image": image_id},
                                 data={"params": json.dumps({"foreground": clicks, "slice_axis": 0})}, timeout=60)
        assert response.status_code == 400, response.text
        assert "slice_axis 0 gives slices of 64x1 voxels" in response.json()["detail"]
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


def test_at_start_the_embeddings_of_gone_or_replaced_volumes_are_deleted(sample_studies, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(sample_studies / f"{IMAGE}.nii.gz", studies)
    embeddings = tmp_path / "embeddings"
    live = f"{volume_id(str(studies / f'{IMAGE}.nii.gz'))}-ax2-lite_medsam-x"
    for key in (live, "0123456789abcdef-ax2-lite_medsam-x"):  # the second: a volume no longer in the datastore
        (embeddings / key).mkdir(parents=True)
        np.save(embeddings / key / "00001.npy", np.zeros((2, 2, 2), np.float16))
    running = local_server.start(tmp_path / "work", studies, conf={"embedding_cache_dir": str(embeddings),
                                                                   "draft": "auto"})  # the app's default
    try:
        assert [p.name for p in embeddings.iterdir()] == [live]
        info = requests.get(f"{running.url}/info/", timeout=30).json()
        assert info["embedding_cache"]["files"] == 1
        assert info["models"]["spd_sam"]["config"]["draft"] == (not torch.cuda.is_available()), "drafts on a CPU"
    finally:
        running.stop()
    os.utime(studies / f"{IMAGE}.nii.gz")  # the volume is replaced: its old embeddings can never be used
    running = local_server.start(tmp_path / "work", studies, conf={"embedding_cache_dir": str(embeddings)})
    running.stop()
    assert not list(embeddings.iterdir())
