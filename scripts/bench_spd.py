"""Benchmark SPD on the Colin27 deep grey structures (real MRI, atlas labels; clicks simulated).

Prints, in one run:
1. Dice and HD95 per structure for SPD and for the same backbone fed the raw clicks (a fixed box
   around each click on its own slice, nothing elsewhere), with rough clicks every 3rd slice,
   about 3 mm drift and 15 % of the clicks on the neighbouring structure.
2. Image encoder ms/slice, eager PyTorch vs the accelerated runtime, and their mask agreement.
3. Through a real server and monailabel.client: first-request and repeat-click times.
4. Peak resident memory of this process.

The clicks are synthetic (simulated annotators); image and labels are real.

    .venv/bin/python scripts/bench_spd.py [--seeds 2] [--axis 2] [--structures right_caudate,...] [--no-server]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "spd_sam"))
sys.path.insert(0, str(ROOT / "scripts"))

from lib.spd.backbones import SlicePrompts, load_backbone  # noqa: E402
from lib.spd.click_simulation import ClickStyle, simulate_clicks  # noqa: E402
from lib.spd.embedding_cache import EmbeddingCache  # noqa: E402
from lib.spd.intensity import choose_window  # noqa: E402
from lib.spd.pipeline import SPDPipeline, VolumeView  # noqa: E402
from lib.spd.prompts import Click  # noqa: E402

STUDIES = ROOT / "sample_studies"
IMAGE = "colin27_t1"
NEIGHBOUR = {"caudate": "putamen", "putamen": "pallidum", "pallidum": "putamen", "thalamus": "caudate",
             "hippocampus": "amygdala", "amygdala": "hippocampus"}
BASELINE_BOX_MM = 20.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    if not a.any() or not b.any():
        return float("nan")
    pred = torch.from_numpy(np.stack([~a, a]))[None].float()
    true = torch.from_numpy(np.stack([~b, b]))[None].float()
    return float(compute_hausdorff_distance(pred, true, percentile=95, spacing=list(spacing))[0, 0])


def raw_click_baseline(pipeline: SPDPipeline, volume, spacing, volume_id, clicks, window, axis) -> np.ndarray:
    """The backbone fed the raw clicks: a fixed box around each click, on its own slice only."""
    view = VolumeView(volume, axis, window)
    in_plane = view.in_plane
    slices = [c[axis] for c in clicks]
    half = np.array([BASELINE_BOX_MM / 2 / spacing[a] for a in in_plane])
    boxes = np.array([[c[in_plane[0]] - half[0], c[in_plane[1]] - half[1], c[in_plane[0]] + half[0],
                       c[in_plane[1]] + half[1]] for c in clicks], dtype=np.float32)
    h, w = view.slice_shape
    boxes = np.clip(boxes, 0, [h - 1, w - 1, h - 1, w - 1]).astype(np.float32)
    unique = sorted(set(slices))
    embeddings = pipeline.embed(volume_id, view, unique)
    logits = pipeline.backbone.decode(embeddings[[unique.index(s) for s in slices]], SlicePrompts(boxes=boxes),
                                      view.slice_shape)
    mask = np.zeros(volume.shape, dtype=bool)
    for s, m in zip(slices, logits > 0):
        index = [slice(None)] * 3
        index[axis] = s
        mask[tuple(index)] |= m
    return mask


def accuracy(args, pipeline, volume, spacing, atlas, labels, window) -> list[dict]:
    rows = []
    for name in args.structures:
        side, kind = name.split("_")
        target = atlas == labels[name]
        distractor = atlas == labels[f"{side}_{NEIGHBOUR[kind]}"]
        for seed in range(args.seeds):
            rng = np.random.default_rng(1000 + seed)
            clicks, off = simulate_clicks(target, spacing, args.axis, ClickStyle(3, 3.0, 0.15), rng, distractor)
            seg = pipeline.segment(volume, spacing, IMAGE, [Click(tuple(c), True) for c in clicks], window,
                                   slice_axis=args.axis)
            base = raw_click_baseline(pipeline, volume, spacing, IMAGE, clicks, window, args.axis)
            row = {"structure": name, "seed": seed, "clicks": len(clicks), "off_target": int(sum(off)),
                   "spd_dice": dice(seg.mask, target), "spd_hd95": hd95(seg.mask, target, spacing),
                   "raw_dice": dice(base, target), "raw_hd95": hd95(base, target, spacing),
                   "caught": sum(1 for status in ("moved", "rejected") for c in seg.consensus[status] if off[c["click"]])}
            rows.append(row)
            print(f"  {name:18s} seed {seed}: clicks {row['clicks']:2d} (off {row['off_target']}, caught {row['caught']})"
                  f"  SPD Dice {row['spd_dice']:.3f} HD95 {row['spd_hd95']:5.1f}"
                  f"  raw Dice {row['raw_dice']:.3f} HD95 {row['raw_hd95']:5.1f}", flush=True)
    return rows


def encoder_speed(backbone_eager, backbone_fast, images: np.ndarray) -> dict:
    out = {}
    for name, backbone in (("eager", backbone_eager), ("accelerated", backbone_fast)):
        backbone.embed(images[:1])
        start = time.perf_counter()
        emb = backbone.embed(images)
        out[name] = (time.perf_counter() - start) / len(images) * 1000
        out[f"{name}_embeddings"] = emb
    rel = float((out["eager_embeddings"] - out["accelerated_embeddings"]).norm() / out["eager_embeddings"].norm())
    return {"eager_ms": out["eager"], "accelerated_ms": out["accelerated"], "relative_error": rel,
            "runtime": backbone_fast.runtime}


def repeat_clicks(client, params, clicks, count: int = 3) -> list[float]:
    """The annotator nudges one click and runs again, ``count`` times."""
    times = []
    for n in range(count):
        moved = [list(c) for c in clicks]
        moved[n][0] += 1
        t = time.perf_counter()
        client.infer("spd_sam", IMAGE, dict(params, foreground=moved))
        times.append(time.perf_counter() - t)
    return times


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def server_timings(atlas, labels, spacing, axis) -> dict:
    import local_server
    from monailabel.client import MONAILabelClient

    work = Path(tempfile.mkdtemp(prefix="spd_bench_"))
    try:
        studies = work / "studies"
        shutil.copytree(STUDIES, studies)
        started = time.perf_counter()
        server = local_server.start(work, studies)
        startup = time.perf_counter() - started
        try:
            client = MONAILabelClient(server.url)
            target = atlas == labels["right_caudate"]
            clicks, _ = simulate_clicks(target, spacing, axis, ClickStyle(3, 3.0, 0.15), np.random.default_rng(5),
                                        atlas == labels["right_putamen"])
            params = {"label": "right_caudate", "foreground": clicks, "background": []}
            t = time.perf_counter()
            _, first = client.infer("spd_sam", IMAGE, params)
            first_s = time.perf_counter() - t
            repeats_busy = repeat_clicks(client, params, clicks)
            deadline = time.monotonic() + 600
            while "background embedding of" not in server.log.read_text() and time.monotonic() < deadline:
                time.sleep(1)
            embedded_s = time.perf_counter() - t
            repeats = repeat_clicks(client, params, clicks)
            again = client.infer("spd_sam", IMAGE, params)[1]
            ohif = dict(params, result_extension=".nrrd", result_dtype="uint8", result_compress=False)
            t = time.perf_counter()
            client.infer("spd_sam", IMAGE, ohif)
            ohif_s = time.perf_counter() - t
            span = first["slice_range"][1] - first["slice_range"][0] + 1
            return {"startup_s": startup, "first_s": first_s, "first_server": first["timing"], "repeat_s": repeats,
                    "repeat_busy_s": repeats_busy, "embedded_s": embedded_s, "repeat_server": again["timing"],
                    "ohif_repeat_s": ohif_s, "slices": span, "server_peak_mib": peak_rss_mib(server.process.pid)}
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    labels = json.loads((ROOT / "apps" / "spd_sam" / "labels.json").read_text())
    parser.add_argument("--structures", default=",".join(labels))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--axis", type=int, default=2)
    parser.add_argument("--no-server", action="store_true", help="skip the client/server timings")
    args = parser.parse_args(argv)
    args.structures = args.structures.split(",")

    image = nib.load(STUDIES / f"{IMAGE}.nii.gz")
    volume = np.asarray(image.dataobj)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    atlas = np.asarray(nib.load(STUDIES / "labels" / "final" / f"{IMAGE}.nii.gz").dataobj)
    window = choose_window(volume)
    cache_dir = Path(tempfile.mkdtemp(prefix="spd_bench_cache_"))
    fast = load_backbone(cache_dir=str(cache_dir / "runtime"))
    eager = load_backbone(runtime="torch")
    eager.runner.settings.chunk = 1  # batching does not help eager TinyViT on the CPU; one slice at a time is its best
    pipeline = SPDPipeline(fast, EmbeddingCache(4 << 30, cache_dir / "embeddings"))

    print(f"== accuracy: Colin27 T1 + AAL, clicks every 3rd slice on axis {args.axis}, 3 mm drift, "
          f"15% off-target (synthetic clicks), {args.seeds} seed(s)")
    rows = accuracy(args, pipeline, volume, spacing, atlas, labels, window)
    print("\n| structure | SPD Dice | raw Dice | SPD HD95 mm | raw HD95 mm |\n|---|---|---|---|---|")
    for name in args.structures:
        r = [x for x in rows if x["structure"] == name]
        print(f"| {name} | {np.mean([x['spd_dice'] for x in r]):.3f} | {np.mean([x['raw_dice'] for x in r]):.3f} | "
              f"{np.nanmean([x['spd_hd95'] for x in r]):.1f} | {np.nanmean([x['raw_hd95'] for x in r]):.1f} |")
    spd, raw = np.mean([x["spd_dice"] for x in rows]), np.mean([x["raw_dice"] for x in rows])
    print(f"| **mean** | **{spd:.3f}** | **{raw:.3f}** | {np.nanmean([x['spd_hd95'] for x in rows]):.1f} | "
          f"{np.nanmean([x['raw_hd95'] for x in rows]):.1f} |")
    print(f"SPD - raw mean Dice: {spd - raw:+.3f}; off-target clicks caught (moved or rejected): "
          f"{sum(x['caught'] for x in rows)}/{sum(x['off_target'] for x in rows)}")

    slices = VolumeView(volume, 2, window).slices(range(80, 88))
    enc = encoder_speed(eager, fast, slices)
    print(f"\n== image encoder (LiteMedSAM, 8 real 181x217 slices): eager {enc['eager_ms']:.0f} ms/slice, "
          f"{enc['runtime']} {enc['accelerated_ms']:.0f} ms/slice ({enc['eager_ms'] / enc['accelerated_ms']:.2f}x), "
          f"relative difference of embeddings {enc['relative_error']:.1e}")

    if not args.no_server:
        t = server_timings(atlas, labels, spacing, args.axis)
        print(f"\n== through monailabel.client (right caudate, {t['slices']} slices, cold cache): server start "
              f"{t['startup_s']:.1f} s, first request {t['first_s']:.1f} s")
        print(f"   repeat click (one click nudged) while the rest of the volume embeds in the background: "
              f"{', '.join(f'{s:.2f}' for s in t['repeat_busy_s'])} s")
        print(f"   whole volume embedded {t['embedded_s']:.0f} s after the first request was sent; repeat click then: "
              f"{', '.join(f'{s:.2f}' for s in t['repeat_s'])} s; OHIF-style uncompressed .nrrd {t['ohif_repeat_s']:.2f} s")
        print(f"   server peak resident memory {t['server_peak_mib']:.0f} MiB")
        print(f"   server timing, first: {t['first_server']}")
        print(f"   server timing, repeat: {t['repeat_server']}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n== peak resident memory of the benchmark process: {peak:.0f} MiB")
    shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
