"""Benchmark one training round through a real server, on a **synthetic** cohort (Colin27 + AAL variations).

1. Makes ``--labelled + 1`` synthetic volumes (``make_cohort.py``); the last one is held out.
2. Segments every label of the held-out volume with the untrained model from simulated clinical
   clicks (one every 3 slices, 3 mm drift, 15 % on the nearest other structure).
3. Starts a server, saves the final labels of the others with ``monailabel.client``, runs
   ``POST /train/spd_sam`` with ``--params`` (default: the trainer's defaults) and times it.
4. Segments the held-out volume again, with the same clicks, with the published checkpoint.
5. Runs a second round on the same labels (embeddings now cached) and times it.
6. Reference: the untrained backbone given the exact box of the true mask on every slice.

Steps 2, 4 and 6 run in this process with the app's own pipeline, so the server's background
embedding does not compete with training for the CPU. The numbers are from synthetic data.

    .venv/bin/python scripts/bench_training.py                       # 4 whole volumes, 12 labels, defaults
    .venv/bin/python scripts/bench_training.py --labels right_caudate,right_putamen \\
        --crop-margin-mm 35,35,8 --slice-mm 2.5 --params '{"max_minutes": 4}'
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from app_path import ROOT  # first: it puts the app folder and scripts/ on sys.path

import numpy as np

import local_server
from make_cohort import Subject, make_cohort, write_cohort
from monailabel.client import MONAILabelClient

from lib.spd.runtime import PromptBatch, load_backbone
from lib.spd.serving import CheckpointStore
from lib.spd.serving import EmbeddingCache
from lib.spd.method import choose_window
from lib.spd.method import SPDPipeline, VolumeView
from lib.spd.serving import ModelReloader
from lib.spd.training import TrainConfig, dice, validate
from lib.spd.training import LabelledVolume

LABELS = json.loads((ROOT / "apps" / "spd_sam" / "labels.json").read_text())
AXIS = 2


def as_volume(subject: Subject) -> LabelledVolume:
    spacing = tuple(float(v) for v in (subject.affine[:3, :3] ** 2).sum(axis=0) ** 0.5)
    return LabelledVolume(subject.name, subject.image, subject.label.astype("int32"), spacing,
                          f"bench-{subject.name}", choose_window(subject.image))


def exact_boxes(pipeline: SPDPipeline, volume: LabelledVolume, labels: dict[str, int], axis: int) -> dict[str, float]:
    """Dice per label of the backbone given the true mask's bounding box on every slice that holds it."""
    view = VolumeView(volume.volume, axis, volume.window)
    scores = {}
    for name, value in labels.items():
        truth = volume.labels == value
        slices = [int(s) for s in np.flatnonzero(truth.any(axis=tuple(view.in_plane)))]
        if not slices:
            continue
        boxes = []
        for s in slices:
            rows, cols = np.nonzero(np.take(truth, s, axis=axis))
            boxes.append([rows.min(), cols.min(), rows.max(), cols.max()])
        logits = pipeline.backbone.decode(pipeline.embed(volume.volume_id, view, slices),
                                          PromptBatch(boxes=np.array(boxes, dtype=np.float32)), view.slice_shape)
        mask = np.zeros_like(truth)
        for s, slice_logits in zip(slices, logits):
            index = [slice(None)] * 3
            index[axis] = s
            mask[tuple(index)] = slice_logits > 0
        scores[name] = dice(mask, truth)
    return scores


def train_rounds(work: Path, subjects: list[Subject], params: dict, rounds: int, studies: Path | None = None,
                 trained: Path | None = None, log_name: str = "server.log") -> list[tuple[float, dict]]:
    """Save final labels, run ``rounds`` rounds one after the other; wall time and last status of each.

    The server keeps its datastore cache (embeddings) in ``work``; it serves ``studies`` (default ``work/studies``)
    and publishes into ``trained`` (default ``work/trained``); final labels come from ``work/labels``.
    """
    server = local_server.start(work, studies or work / "studies", conf={"trained_dir": str(trained or work / "trained")},
                                log_name=log_name)
    try:
        client = MONAILabelClient(server.url, tmpdir=str(work))
        for subject in subjects:
            client.save_label(subject.name, str(work / "labels" / f"{subject.name}.nii.gz"), tag="final")
        times = []
        for _ in range(rounds):
            started = time.monotonic()
            client.train_start("spd_sam", params)
            status = client.train_status()
            while status["status"] in ("SUBMITTED", "RUNNING"):
                time.sleep(5)
                status = client.train_status()
            times.append((time.monotonic() - started, status))
            print(f"training round {len(times)}: {status['status']} after {times[-1][0]:.0f} s (request {params})",
                  flush=True)
        return times
    finally:
        server.stop()
        print(f"server log: {server.log}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=int, default=4, help="volumes with final labels (one more is held out)")
    parser.add_argument("--labels", default="", help="comma-separated structures (default: all 12)")
    parser.add_argument("--crop-margin-mm", default=None, help="crop around the structures (one or three values)")
    parser.add_argument("--slice-mm", type=float, default=None)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--params", default="{}", help="train request params as JSON")
    parser.add_argument("--rounds", type=int, default=2, help="rounds in a row (the later ones reuse embeddings)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (cohort, models, logs; ~2 GB)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="spd_bench_training_"))
    try:
        run(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    """Train on the synthetic cohort in ``work`` and print the held-out table."""
    names = [n for n in args.labels.split(",") if n] or list(LABELS)
    margin = None if args.crop_margin_mm is None else [float(v) for v in args.crop_margin_mm.split(",")]
    subjects = make_cohort(args.labelled + 1, args.seed, names, margin, args.slice_mm)
    write_cohort(subjects, work / "studies", label_dir=work / "labels")
    held_out = as_volume(subjects[-1])
    print(f"synthetic cohort in {work}: {len(subjects)} volumes of shape {subjects[0].image.shape}; "
          f"held out {held_out.name}")

    backbone = load_backbone(cache_dir=str(ROOT / "apps" / "spd_sam" / "model" / "runtime"))
    pipeline = SPDPipeline(backbone, EmbeddingCache(4 << 30, work / "eval_cache"))
    labels = {n: LABELS[n] for n in names}
    clicks = TrainConfig(click_every=(3,), seed=args.seed)
    tic = time.monotonic()
    before = {focus: validate(pipeline, [held_out], labels, AXIS, clicks, focus=focus) for focus in (True, False)}
    print(f"untrained model on the held-out volume: {time.monotonic() - tic:.0f} s")
    reference = exact_boxes(pipeline, held_out, labels, AXIS)

    rounds = train_rounds(work, subjects[:-1], json.loads(args.params), args.rounds)
    store = CheckpointStore(work / "trained")
    version = ModelReloader(store, pipeline).refresh()
    after = {focus: validate(pipeline, [held_out], labels, AXIS, clicks, focus=focus) if version else {}
             for focus in (True, False)}
    print(f"published v{version}: validation Dice {store.metadata().get('val_dice')}; curve {store.path(version or 0, '.png')}")
    print("round times: " + ", ".join(f"{seconds:.0f} s ({status['status']})" for seconds, status in rounds))
    print("\nheld-out volume, rough clicks (every 3rd slice, 3 mm drift, 15 % off target); SPD as served (masks "
          "decoded in a region around each structure) and on whole slices; reference: exact boxes on whole slices")
    columns = [before[True], after[True], before[False], after[False], reference]
    print(f"{'structure':20s} {'untrained':>9s} {'trained':>8s} {'untrained, whole':>16s} {'trained, whole':>14s} "
          f"{'exact boxes':>11s}")
    widths = (9, 8, 16, 14, 11)
    for name in before[True]:
        print(f"{name:20s} " + " ".join(f"{c.get(name, float('nan')):{w}.3f}" for c, w in zip(columns, widths)))
    mean = lambda d: sum(d.values()) / len(d) if d else float("nan")  # noqa: E731
    print(f"{'mean':20s} " + " ".join(f"{mean(c):{w}.3f}" for c, w in zip(columns, widths)))


if __name__ == "__main__":
    main()
