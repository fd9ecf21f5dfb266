"""End to end: the OHIF v3 viewer bundled with MONAI Label, in a real headless Chromium, segments with spd_sam.

A private Orthanc holds the Colin27 T1 as an MR series; a real MONAI Label server runs on its DICOMweb
root and serves OHIF at ``/ohif/``. ``tests/ohif/ohif_flow.mjs`` drives Debian's ``chromium`` with
Playwright's ``playwright-core`` (npm, installed into ``tests/ohif/node_modules``): study list, the study
in the MONAI Label mode, the MONAI Label panel connected to the server, Point Prompts with model
``spd_sam`` and label ``right_caudate``, one foreground click on each of four axial slices (scrolled to
with the mouse wheel, clicked with the panel's own probe tool), Run. The checks read the viewer's
labelmap, screenshot pixels and the server log. Screenshots are written to a folder printed at the end.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import local_server
import nibabel as nib
import numpy as np
import orthanc
import pytest
from nifti_to_dicom import DicomSeries, nifti_to_dicom
from PIL import Image

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
DRIVER_DIR = ROOT / "tests" / "ohif"
DRIVER = DRIVER_DIR / "ohif_flow.mjs"
CHROMIUM = "/usr/bin/chromium"
LABELS = json.loads((ROOT / "apps/spd_sam/labels.json").read_text())
MR = "colin27_t1"
TARGET = "right_caudate"
CLICK_SLICES = 4
FLOW_TIMEOUT_S = 900
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (root only); skip the module when it cannot be had."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing and this process is not root: apt-get install -y chromium")
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    if subprocess.run(install, env=APT_ENV, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=APT_ENV, capture_output=True)
        done = subprocess.run(install, env=APT_ENV, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"apt-get install chromium failed: {done.stderr[-1000:]}")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not found after apt-get install chromium")
    return CHROMIUM


def ensure_playwright_core() -> str:
    """node, and playwright-core installed from npm into tests/ohif/node_modules (pinned in tests/ohif/package.json)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed to drive the browser (apt-get install nodejs npm)")
    if not (DRIVER_DIR / "node_modules" / "playwright-core" / "package.json").is_file():
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=DRIVER_DIR,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"npm install playwright-core failed: {done.stderr[-1000:]}")
    return node


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> orthanc.OrthancServer:
    try:
        server = orthanc.start(tmp_path_factory.mktemp("ohif_orthanc"))
    except RuntimeError as error:
        pytest.skip(f"Orthanc could not be installed or started: {error}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def series(pacs, sample_studies, tmp_path_factory) -> DicomSeries:
    """The Colin27 T1 as an MR series in Orthanc (voxel indices as in the NIfTI)."""
    written = nifti_to_dicom(sample_studies / f"{MR}.nii.gz", tmp_path_factory.mktemp("ohif_dicom") / MR)
    pacs.upload(written.files)
    return written


@pytest.fixture(scope="module")
def ohif_server(pacs, series, tmp_path_factory) -> local_server.LocalServer:
    running = local_server.start(tmp_path_factory.mktemp("ohif_server"), pacs.dicomweb_url)
    yield running
    running.stop()
    print(f"\nserver log: {running.log}")


@pytest.fixture(scope="module")
def atlas_target(sample_studies) -> np.ndarray:
    """The atlas's right caudate on the Colin27 grid (bool, i j k)."""
    return np.asarray(nib.load(sample_studies / "labels" / "final" / f"{MR}.nii.gz").dataobj) == LABELS[TARGET]


@pytest.fixture(scope="module")
def clicks(atlas_target) -> list[list[int]]:
    """One click per axial slice on CLICK_SLICES slices spread over the structure: its voxel nearest the slice centroid."""
    ks = np.flatnonzero(atlas_target.any(axis=(0, 1)))
    points = []
    for k in np.linspace(ks.min(), ks.max(), CLICK_SLICES + 2)[1:-1].round().astype(int):
        ii, jj = np.nonzero(atlas_target[:, :, k])
        n = int(np.argmin((ii - ii.mean()) ** 2 + (jj - jj.mean()) ** 2))
        points.append([int(ii[n]), int(jj[n]), int(k)])
    return points


@pytest.fixture(scope="module")
def flow(ohif_server, clicks, tmp_path_factory) -> dict:
    """Run the browser flow once for the module; its result (see ohif_flow.mjs) with the screenshot folder."""
    chromium = ensure_chromium()
    node = ensure_playwright_core()
    work = tmp_path_factory.mktemp("ohif_browser")
    shots = work / "screenshots"
    config = {"server": ohif_server.url, "patient": MR, "model": "spd_sam", "label": TARGET, "points": clicks,
              "box_px": 120, "shots": str(shots), "profile": str(work / "profile"), "chromium": chromium,
              "infer_timeout_ms": 600_000}
    (work / "config.json").write_text(json.dumps(config))
    done = subprocess.run([node, str(DRIVER), str(work / "config.json")], cwd=DRIVER_DIR, capture_output=True,
                          text=True, timeout=FLOW_TIMEOUT_S)
    (work / "driver.log").write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    print(f"\nOHIF screenshots: {shots}\ndriver log: {work / 'driver.log'}")
    assert lines, f"the browser driver printed no result (rc {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    result["shots_dir"] = str(shots)
    return result


def no_error(flow: dict) -> None:
    assert "error" not in flow, f"{flow['error']}\nscreenshots: {flow['shots_dir']}\npage errors: {flow['page_errors']}"


def non_black_fraction(png: str, rect: dict) -> float:
    box = tuple(round(v) for v in (rect["x"], rect["y"], rect["x"] + rect["width"], rect["y"] + rect["height"]))
    pixels = np.asarray(Image.open(png).convert("L").crop(box))
    return float((pixels > 30).mean())


def infer_requests(server: local_server.LocalServer) -> list[dict]:
    """The ``Infer Request: {...}`` lines of the server log, parsed."""
    found = re.findall(r"Infer Request: (\{.*\})", server.log.read_text(errors="replace"))
    return [ast.literal_eval(one) for one in found]


def test_viewer_opens_the_study_with_the_image_rendered(flow, series):
    assert flow["steps"] and flow["steps"][0]["name"] == "study_list", flow.get("error")
    viewer = next((s for s in flow["steps"] if s["name"] == "viewer"), None)
    assert viewer, flow.get("error")
    assert f"StudyInstanceUIDs={series.study_uid}" in viewer["url"]
    axial = viewer["axial"]
    assert axial["loaded"] and axial["dimensions"] == [181, 217, 181] and axial["spacing"] == [1, 1, 1]
    # the axial view shows the head: a good part of the viewport is not black
    assert non_black_fraction(flow["viewer_shot"], axial["rect"]) > 0.15


def test_viewer_assets_that_monailabel_answers_with_index_html_are_only_icons(flow):
    """monailabel's /ohif/ route answers nested paths with index.html (path.replace("/", os.pathsep)); the viewer
    works in spite of it because its scripts, styles, workers and wasm sit at the top level of /ohif/."""
    assert flow["page_errors"] == []
    assert all(p.endswith((".png", ".ico")) for p in flow["html_for_asset"]), flow["html_for_asset"]


def test_monai_label_panel_connects_and_lists_spd_sam_for_point_prompts(flow):
    assert any(s["name"] == "connected" for s in flow["steps"]), flow.get("error")
    assert "SPD-SAM" in flow["panel_text"] and TARGET in flow["panel_text"]
    assert [m.strip() for m in flow["models"]] == ["spd_sam"]


def test_clicks_reach_the_server_as_foreground_points_of_an_spd_sam_request(flow, ohif_server, series, clicks,
                                                                            atlas_target):
    no_error(flow)
    assert len(flow["probe_points"]) == len(clicks), "one probe annotation per click"
    assert all(c["mark"]["pixels"] >= 10 for c in flow["clicks"]), f"a probe mark at each click: {flow['clicks']}"
    assert flow["infer_status"] == 200 and flow["success_notification"], "the panel reports a successful run"
    assert f"/infer/spd_sam?image={series.series_uid}" in flow["infer_url"]
    requests = [r for r in infer_requests(ohif_server) if r.get("model") == "spd_sam" and r.get("foreground")]
    assert requests, f"no spd_sam infer request with foreground points in {ohif_server.log}"
    sent = requests[-1]
    assert sent["image"] == series.series_uid and sent["background"] == []
    assert sent["result_extension"] == ".nrrd"
    foreground = sorted(sent["foreground"], key=lambda p: p[2])
    assert len(foreground) == len(clicks)
    for got, want in zip(foreground, clicks):
        assert got[2] == want[2], "each click on the slice it was meant for"
        assert max(abs(g - w) for g, w in zip(got, want)) <= 1, f"click {got} for voxel {want}"
    assert sum(bool(atlas_target[tuple(p)]) for p in foreground) >= len(clicks) - 1


def test_result_is_drawn_as_the_target_segment_over_the_caudate(flow, atlas_target):
    no_error(flow)
    assert flow["labelmap_before"]["counts"] == {}
    after = flow["labelmap_after"]
    index = next(s["index"] for s in after["segments"] if s["label"] == TARGET)
    assert list(after["counts"]) == [str(index)], "only the target segment is painted"
    mask = np.zeros(atlas_target.size, bool)
    mask[np.asarray(after["voxels"], dtype=np.int64)] = True
    mask = mask.reshape(atlas_target.shape[::-1]).transpose(2, 1, 0)  # viewer order: i fastest, then j, then k
    dice = 2 * np.logical_and(mask, atlas_target).sum() / (mask.sum() + atlas_target.sum())
    print(f"viewer labelmap: {mask.sum()} voxels, Dice with the atlas {TARGET} {dice:.3f}")
    assert dice >= 0.5
    # the overlay is visible on screen: coloured pixels around the middle click, far more than the probe marks before
    before, after_px = flow["pixels_before"]["coloured"], flow["pixels_after"]["coloured"]
    assert after_px >= max(3 * before, 150), (before, after_px, flow["result_shot"])
    assert Path(flow["zoom_shot"]).is_file()
