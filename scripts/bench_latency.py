"""Latency of SPD: image encoder runtimes, and first-request and repeat-click times through a real server.

Prints, in one run:
1. Image encoder ms/slice, eager PyTorch vs the accelerated runtime, and their agreement.
2. A first click on a cold volume, in-process: the full pipeline vs a draft from the clicked slices (``draft.py``),
   then the full result once the rest of the structure's slices are embedded (as the server's background does);
   seconds and Dice of each, per structure of the Colin27 sample study and click spacing (rough axial clicks).
3. Through a real server and monailabel.client: first-request, repeat-click and corrective-click times (right
   caudate of the Colin27 sample study, simulated rough clicks every 3rd axial slice; corrective clicks at the
   centre of the largest error, as ``bench_corrections.py`` places them).
4. Peak resident memory of this process.

    .venv/bin/python scripts/bench_latency.py [--parts encoder,first-click,server] [--structures a,b] [--every 3,5]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from app_path import ROOT  # first: it puts the app folder and scripts/ on sys.path

from annotator import corrective_click
from lib.spd.runtime import load_backbone
from lib.spd.training import ClickStyle, simulate_clicks
from lib.spd.method import choose_window
from lib.spd.method import VolumeView

STUDIES = ROOT / "sample_studies"
IMAGE = "colin27_t1"
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


def first_click(backbone, volume, spacing, atlas, labels, structures, every: int) -> list[dict]:
    """Per structure: the full pipeline and a draft, each on an empty embedding cache, then the full result after
    the slices the draft left out are embedded."""
    from lib.spd.method import Click, SPDPipeline, segment_range
    from lib.spd.serving import EmbeddingCache

    window, rows = choose_window(volume), []
    for name in structures:
        target = atlas == labels[name]
        clicks, _ = simulate_clicks(target, spacing, 2, ClickStyle(every, 3.0, 0.15), np.random.default_rng(5))
        prompts = [Click(tuple(c), True) for c in clicks]
        row = {"structure": name}
        for mode in ("full", "draft"):
            pipeline = SPDPipeline(backbone, EmbeddingCache(4 << 30))
            tic = time.perf_counter()
            seg = pipeline.segment(volume, spacing, IMAGE, prompts, window, slice_axis=2, draft=mode == "draft")
            row[mode] = (time.perf_counter() - tic, dice(seg.mask, target))
        first, last = segment_range(prompts, 2, volume.shape[2], None)
        whole = VolumeView(volume, 2, window)
        tic = time.perf_counter()
        pipeline.embed(IMAGE, whole, range(first, last + 1))
        if seg.focus is not None:
            pipeline.embed(IMAGE, whole.focused(seg.focus), range(first, last + 1))
        row["background_s"] = time.perf_counter() - tic
        tic = time.perf_counter()
        refined = pipeline.segment(volume, spacing, IMAGE, prompts, window, slice_axis=2, draft=True)
        row["refined"] = (time.perf_counter() - tic, dice(refined.mask, target))
        row["draft_info"], row["refined_is_full"] = seg.draft, refined.draft is None
        rows.append(row)
        print(f"   {name}, every {every}: full {row['full'][0]:.1f} s (Dice {row['full'][1]:.3f}); draft {row['draft'][0]:.1f} s "
              f"(Dice {row['draft'][1]:.3f}, {seg.draft}); rest embedded in {row['background_s']:.1f} s; then the "
              f"same request {row['refined'][0]:.2f} s (Dice {row['refined'][1]:.3f}, full: {row['refined_is_full']})",
              flush=True)
    return rows


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / max(float(a.sum() + b.sum()), 1.0)


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


def corrective_clicks(client, params, truth: np.ndarray, spacing, count: int = 3) -> list[tuple[bool, float]]:
    """The annotator corrects the result ``count`` times, each click at the centre of the largest error (positive
    where it missed, negative where it leaked), all points resent; (positive, seconds) per click."""
    params = dict(params, foreground=list(params["foreground"]), background=list(params["background"]))
    result_file, _ = client.infer("spd_sam", IMAGE, params)  # the session's first result (the clicks are new)
    times = []
    for _ in range(count):
        click = corrective_click(np.asarray(nib.load(result_file).dataobj) > 0, truth, spacing)
        if click is None:
            break
        params["foreground" if click[1] else "background"].append(click[0])
        t = time.perf_counter()
        result_file, result = client.infer("spd_sam", IMAGE, params)
        times.append((click[1], time.perf_counter() - t))
        assert result["interaction"]["mode"] == "correction", result["interaction"]
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
            client = MONAILabelClient(server.url, tmpdir=str(work / "client"))  # removed with the work folder
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
            corrections = corrective_clicks(client, params, target, spacing)
            fresh = lambda name: dict(params, client_id=name)  # noqa: E731  (a new session: the full pipeline again)
            again = client.infer("spd_sam", IMAGE, fresh("repeat"))[1]
            ohif = dict(fresh("ohif"), result_extension=".nrrd", result_dtype="uint8", result_compress=False)
            t = time.perf_counter()
            client.infer("spd_sam", IMAGE, ohif)
            ohif_s = time.perf_counter() - t
            span = first["slice_range"][1] - first["slice_range"][0] + 1
            return {"startup_s": startup, "first_s": first_s, "first_server": first["timing"], "repeat_s": repeats,
                    "corrective_s": corrections,
                    "repeat_busy_s": repeats_busy, "embedded_s": embedded_s, "repeat_server": again["timing"],
                    "ohif_repeat_s": ohif_s, "slices": span, "server_peak_mib": peak_rss_mib(server.process.pid)}
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="encoder,first-click,server",
                        help="comma-separated: encoder, first-click, server")
    parser.add_argument("--structures", default="right_caudate,left_putamen,right_thalamus,left_hippocampus",
                        help="structures of the first-click part")
    parser.add_argument("--every", default="3,5", help="click spacings (slices) of the first-click part")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    labels = json.loads((ROOT / "apps" / "spd_sam" / "labels.json").read_text())
    image = nib.load(STUDIES / f"{IMAGE}.nii.gz")
    volume = np.asarray(image.dataobj)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    atlas = np.asarray(nib.load(STUDIES / "labels" / "final" / f"{IMAGE}.nii.gz").dataobj)
    window = choose_window(volume)
    cache_dir = Path(tempfile.mkdtemp(prefix="spd_bench_cache_"))
    fast = load_backbone(cache_dir=str(cache_dir / "runtime"))
    eager = load_backbone(runtime="torch")
    eager.runner.settings.chunk = 1  # batching does not help eager TinyViT on the CPU; one slice at a time is its best

    if "encoder" in parts:
        slices = VolumeView(volume, 2, window).slices(range(80, 88))
        enc = encoder_speed(eager, fast, slices)
        print(f"\n== image encoder (LiteMedSAM, 8 real 181x217 slices): eager {enc['eager_ms']:.0f} ms/slice, "
              f"{enc['runtime']} {enc['accelerated_ms']:.0f} ms/slice ({enc['eager_ms'] / enc['accelerated_ms']:.2f}x), "
              f"relative difference of embeddings {enc['relative_error']:.1e}")

    if "first-click" in parts:
        print("\n== first click on a cold volume (in-process, rough axial clicks, 3 mm drift, 15 % off target)")
        for every in (int(e) for e in args.every.split(",")):
            rows = first_click(fast, volume, spacing, atlas, labels, args.structures.split(","), every)
            full, drafted = (sum(r[m][0] for r in rows) for m in ("full", "draft"))
            print(f"   clicks every {every}: full {full:.1f} s, draft {drafted:.1f} s ({full / drafted:.2f}x sooner); "
                  f"mean Dice full {np.mean([r['full'][1] for r in rows]):.3f}, draft "
                  f"{np.mean([r['draft'][1] for r in rows]):.3f}, refined {np.mean([r['refined'][1] for r in rows]):.3f}")

    if "server" in parts:
        t = server_timings(atlas, labels, spacing, 2)
        print(f"\n== through monailabel.client (right caudate, {t['slices']} slices, cold cache): server start "
              f"{t['startup_s']:.1f} s, first request {t['first_s']:.1f} s")
        print(f"   repeat click (one click nudged) while the rest of the volume embeds in the background: "
              f"{', '.join(f'{s:.2f}' for s in t['repeat_busy_s'])} s")
        print(f"   whole volume embedded {t['embedded_s']:.0f} s after the first request was sent; repeat click then: "
              f"{', '.join(f'{s:.2f}' for s in t['repeat_s'])} s; OHIF-style uncompressed .nrrd {t['ohif_repeat_s']:.2f} s")
        print("   corrective click (all points resent, the result corrected in place): "
              + ", ".join(f"{'positive' if positive else 'negative'} {s:.2f}" for positive, s in t["corrective_s"])
              + " s")
        print(f"   server peak resident memory {t['server_peak_mib']:.0f} MiB")
        print(f"   server timing, first: {t['first_server']}")
        print(f"   server timing, repeat: {t['repeat_server']}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n== peak resident memory of the benchmark process: {peak:.0f} MiB")
    shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
