"""Benchmark the annotation loop on a **synthetic** cohort: does retraining reduce the corrections?

Volumes (``make_cohort.py``: Colin27 + AAL variations) arrive one by one. For each, a simulated
annotator drops rough clicks (one every 3 slices, 3 mm drift, 15 % on the nearest other structure)
on every structure; SPD segments it twice, with the untrained model and with the model retrained
every ``--every`` volumes on all volumes labelled so far; the annotator then "corrects" the mask
(the true label is saved). Printed per volume and structure: Dice and voxels to fix (false
positives + false negatives) without and with retraining.

Runs in this process with the app's own pipeline and training round (no server).

    .venv/bin/python scripts/bench_annotation_loop.py [--volumes 6] [--every 2] [--minutes 2] \\
        [--labels right_caudate,right_putamen]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from app_path import ROOT  # first: it puts the app folder and scripts/ on sys.path

from make_cohort import make_cohort

from lib.spd.runtime import load_backbone
from lib.spd.training import ClickStyle
from lib.spd.serving import EmbeddingCache
from lib.spd.method import choose_window
from lib.spd.method import SPDPipeline
from lib.spd.training import TrainConfig, dice, run_training
from lib.spd.training.data import LabelledVolume, clicks_for, split_by_volume

LABELS = json.loads((ROOT / "apps" / "spd_sam" / "labels.json").read_text())
AXIS = 2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=6)
    parser.add_argument("--every", type=int, default=2, help="retrain after this many newly labelled volumes")
    parser.add_argument("--minutes", type=float, default=2.0, help="budget of each training round")
    parser.add_argument("--labels", default="right_caudate,right_putamen")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    names = [n for n in args.labels.split(",") if n]
    labels = {n: LABELS[n] for n in names}
    subjects = make_cohort(args.volumes, args.seed, names, crop_margin_mm=(35, 35, 8), slice_mm=2.5)
    runtime = str(ROOT / "apps" / "spd_sam" / "model" / "runtime")
    cache_dir = tempfile.TemporaryDirectory(prefix="spd_bench_loop_")  # removed when the run ends
    cache = EmbeddingCache(4 << 30, Path(cache_dir.name))
    fixed = SPDPipeline(load_backbone(cache_dir=runtime), cache)
    retrained = SPDPipeline(load_backbone(cache_dir=runtime), cache)
    style = ClickStyle(3, 3.0, 0.15)
    labelled, rows = [], []
    print(f"synthetic cohort: {args.volumes} volumes {subjects[0].image.shape} (2.5 mm slices), structures {names}; "
          f"retraining every {args.every} volumes, {args.minutes} min per round")
    for n, subject in enumerate(subjects):
        spacing = tuple(float(v) for v in np.sqrt((subject.affine[:3, :3] ** 2).sum(axis=0)))
        volume = LabelledVolume(subject.name, subject.image, subject.label.astype(np.int32), spacing,
                                f"loop-{subject.name}", choose_window(subject.image))
        for name, value in labels.items():
            clicks = clicks_for(volume, value, AXIS, style, np.random.default_rng([args.seed, n, value]))
            truth = volume.labels == value
            row = {"volume": n, "structure": name, "labelled_before": len(labelled)}
            for key, pipeline in (("fixed", fixed), ("retrained", retrained)):
                mask = pipeline.segment(volume.volume, spacing, volume.volume_id, clicks, volume.window, label=name,
                                        slice_axis=AXIS).mask
                row[f"{key}_dice"], row[f"{key}_fix"] = dice(mask, truth), int((mask ^ truth).sum())
            rows.append(row)
            print(f"volume {n} {name:15s} ({len(labelled)} labelled so far): Dice {row['fixed_dice']:.3f} -> "
                  f"{row['retrained_dice']:.3f}; voxels to fix {row['fixed_fix']} -> {row['retrained_fix']}", flush=True)
        labelled.append(volume)  # the annotator saves the corrected (true) label
        if len(labelled) % args.every == 0 and n < len(subjects) - 1:
            train_names, val_names = split_by_volume([v.name for v in labelled], 0.25, args.seed)
            by_name = {v.name: v for v in labelled}
            tic = time.monotonic()
            result = run_training(retrained, [by_name[k] for k in train_names], [by_name[k] for k in val_names],
                                  labels, AXIS, TrainConfig(max_seconds=60 * args.minutes, seed=args.seed))
            print(f"  retrained on {len(labelled)} volumes in {time.monotonic() - tic:.0f} s: validation Dice "
                  f"{ {k: round(v, 3) for k, v in result.val_dice.items()} } (decoder epoch {result.decoder_epoch})",
                  flush=True)
    after_first = [r for r in rows if r["labelled_before"] >= args.every]
    for key in ("fixed", "retrained"):
        print(f"{key:9s}: mean Dice {np.mean([r[f'{key}_dice'] for r in after_first]):.3f}, voxels to fix "
              f"{sum(r[f'{key}_fix'] for r in after_first)} over the volumes after the first round")


if __name__ == "__main__":
    main()
