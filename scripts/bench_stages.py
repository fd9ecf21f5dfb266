"""Seconds per stage of SPD's repeat clicks on an embedded volume, in-process; with ``--against``, another revision's
code measured the same way in the same run.

The right caudate of the Colin27 sample study (43 axial slices), rough clicks every 3rd axial slice. The structure's
slices are embedded first (not timed; the embedding cache is shared by both runs), then each repeat moves one click by
a slice, as an annotator nudging a click does (the mask memo answers the slices whose prompts did not change). Two
saliencies: appearance (untrained), and a trained head with random weights (its speed only). Printed: the median
seconds of each stage over the repeats, per code and saliency, and the Dice and a digest of the last repeat's mask
(the same for both revisions unless a change altered results). Each code runs in a process of its own after a
process that embeds the slices, so that neither pays for having embedded them.

    .venv/bin/python scripts/bench_stages.py [--against REV] [--repeats 6]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from app_path import APP_DIR, ROOT  # first: it puts the app folder and scripts/ on sys.path

STRUCTURE, NEIGHBOUR = "right_caudate", "right_putamen"


def measure(app: Path, cache: Path, repeats: int) -> dict:
    """{saliency: {stage: median seconds, "total": ..., "dice": ...}} for the code of ``app`` (imported here)."""
    sys.path.insert(0, str(app))
    import torch
    from lib.spd.method import Click, SPDPipeline, choose_window
    from lib.spd.method.saliency_head import SaliencyHead
    from lib.spd.runtime import load_backbone
    from lib.spd.serving import EmbeddingCache
    from lib.spd.training import ClickStyle, simulate_clicks

    image = nib.load(ROOT / "sample_studies" / "colin27_t1.nii.gz")
    volume, spacing = np.asarray(image.dataobj), tuple(float(s) for s in image.header.get_zooms()[:3])
    atlas = np.asarray(nib.load(ROOT / "sample_studies" / "labels" / "final" / "colin27_t1.nii.gz").dataobj)
    labels = json.loads((APP_DIR / "labels.json").read_text())
    target = atlas == labels[STRUCTURE]
    clicks, _ = simulate_clicks(target, spacing, 2, ClickStyle(3, 3.0, 0.15), np.random.default_rng(5),
                                atlas == labels[NEIGHBOUR])
    pipeline = SPDPipeline(load_backbone(cache_dir=str(cache / "runtime")), EmbeddingCache(directory=cache / "emb"))
    window = choose_window(volume)
    torch.manual_seed(0)
    head = SaliencyHead([STRUCTURE], axis=2).eval().for_label(STRUCTURE)
    out = {}
    for saliency, state in (("appearance", pipeline.state), ("trained head", pipeline.state.replace(
            saliency_heads={STRUCTURE: head}))):
        pipeline.serve(state)
        timings = []
        for n in range(repeats + 1):  # the first request embeds and fills the memo; not timed
            moved = [list(c) for c in clicks]
            moved[n % len(moved)][2] += n % 2 * 2 - 1 if n else 0
            tic = time.perf_counter()
            seg = pipeline.segment(volume, spacing, "colin27", [Click(tuple(c), True) for c in moved], window,
                                   label=STRUCTURE, slice_axis=2)
            if n:
                timings.append(dict(seg.timings, total=time.perf_counter() - tic))
        row = {stage: float(np.median([t.get(stage, 0.0) for t in timings])) for stage in timings[0]}
        row["dice"] = float(2 * (seg.mask & target).sum() / (seg.mask.sum() + target.sum()))
        row["mask"] = hashlib.sha1(np.packbits(seg.mask)).hexdigest()[:10]
        out[saliency] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="a git revision whose code is measured the same way, after this one")
    parser.add_argument("--repeats", type=int, default=6, help="nudged repeat clicks timed per saliency")
    parser.add_argument("--cache", default=None, help="embedding cache kept between runs (default: a temporary one)")
    parser.add_argument("--app", help=argparse.SUPPRESS)  # the app folder to measure (set for --against's run)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spd_bench_stages_") as scratch:
        cache = Path(args.cache or scratch)
        if args.app:
            Path(args.json).write_text(json.dumps(measure(Path(args.app), cache, args.repeats)))
            return

        def measured(app: Path, repeats: int) -> dict:  # in a process of its own, on the shared cache
            report = Path(scratch) / "report.json"
            subprocess.run([sys.executable, __file__, "--app", str(app), "--cache", str(cache), "--repeats",
                            str(repeats), "--json", str(report)], check=True)
            return json.loads(report.read_text())

        measured(APP_DIR, 1)  # embeds; not reported: the process that embedded ran slower afterwards
        results = {"this code": measured(APP_DIR, args.repeats)}
        if args.against:
            tree = Path(scratch) / "against"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), args.against],
                           check=True)
            try:
                results[args.against] = measured(tree / "apps" / "spd_sam", args.repeats)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    stages = [s for s in next(iter(results.values()))["appearance"] if s not in ("dice", "mask")]
    print(f"median seconds per stage over {args.repeats} nudged repeat clicks ({STRUCTURE}, Colin27 sample study)")
    print("| code | saliency | " + " | ".join(stages) + " | Dice | mask (sha1) |")
    print("|---" * (len(stages) + 4) + "|")
    for code, rows in results.items():
        for saliency, row in rows.items():
            print(f"| {code} | {saliency} | " + " | ".join(f"{row.get(s, 0.0):.3f}" for s in stages)
                  + f" | {row['dice']:.3f} | {row['mask']} |")


if __name__ == "__main__":
    main()
