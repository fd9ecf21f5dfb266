"""Auto segmentation (``spd_sam_auto``) after training on 2, 4 and 8 labelled volumes, on a **synthetic** cohort.

1. Makes ``max(--labelled) + --held-out`` synthetic volumes (``make_cohort.py``: warped Colin27 + AAL, cropped around
   ``--labels``); the last ``--held-out`` ones are never labelled.
2. For each count N: a real server on the first N volumes, their final labels saved with ``monailabel.client``, one
   default training round (``POST /train/spd_sam``, no params unless ``--params``). The servers share one
   embedding cache, so later counts embed nothing again.
3. On each held-out volume, with the model published for N, in this process (the app's own pipeline):
   - **auto**: ``SPDPipeline.segment_learned`` (what ``spd_sam_auto`` runs), no clicks; seconds per volume;
   - **clicked**: ``spd_sam`` from the centre annotator of ``bench_spd.py`` (a click every 3rd axial slice, 3 mm
     drift, 15 % off target), same clicks for every N; untrained as well;
   - **typical boxes**: plain SAM from the same clicks (the baseline): a box of the structure's median in-plane size
     in the labelled pool around each click, carried to the slices between clicks (``bench_spd.py``'s baseline);
   - **exact boxes**: the untrained backbone from the true box on every slice (the ceiling);
   - **absent**: the volume cut just past one side of the structure (along the axis and side that keep the most
     of the volume), so it is missing: auto's voxels there, against 1 % of the structure's voxels.

    .venv/bin/python scripts/bench_auto.py [--labelled 2,4,8] [--held-out 2] [--seed 21] [--json rows.json]
    .venv/bin/python scripts/bench_auto.py --work /tmp/spd_bench_auto_x   # again: reuses its embeddings and models
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

from annotator import clicks_for
from bench_spd import CENTRE, Case, baseline_boxes, decode_boxes, exact_boxes, typical_sizes
from bench_training import train_rounds
from make_cohort import Subject, make_cohort, write_cohort

from lib.spd.method import Click, SPDPipeline, TrainedState, VolumeView, choose_window
from lib.spd.method.focus import FocusConfig
from lib.spd.runtime import load_backbone
from lib.spd.serving import CheckpointStore, EmbeddingCache, ModelReloader
from lib.spd.training import dice

LABELS = json.loads((ROOT / "apps" / "spd_sam" / "labels.json").read_text())
RIGHT = [n for n in LABELS if n.startswith("right_")]
ABSENT_FRACTION = 0.01  # an absent structure's voxels must stay under this fraction of its true volume


def as_case(subject: Subject, names: list[str]) -> Case:
    spacing = tuple(float(v) for v in np.sqrt((subject.affine[:3, :3] ** 2).sum(axis=0)))
    return Case(subject.name, subject.image, subject.label, spacing, {n: LABELS[n] for n in names})


def without(case: Case, value: int, gap: int = 2) -> tuple[np.ndarray, str]:
    """The case's image cut ``gap`` voxels past one side of structure ``value``: of the six cuts (two sides of
    each axis), the one that keeps the most voxels."""
    truth = case.labels == value
    best = None
    for axis in range(3):
        present = np.flatnonzero(truth.any(axis=tuple(a for a in range(3) if a != axis)))
        for keep in (slice(0, max(present[0] - gap, 0)), slice(present[-1] + 1 + gap, None)):
            index = [slice(None)] * 3
            index[axis] = keep
            part = case.image[tuple(index)]
            if min(part.shape) >= 8 and (best is None or part.size > best[0].size):
                best = (part, f"axis {axis} [{keep.start or 0}:{'' if keep.stop is None else keep.stop}]")
    return best


def clicked(pipeline: SPDPipeline, case: Case, name: str, clicks: list[Click]) -> float:
    seg = pipeline.segment(case.image, case.spacing, case.name, clicks, choose_window(case.image), label=name,
                           slice_axis=CENTRE.view)
    return dice(seg.mask, case.labels == case.structures[name])


def auto(pipeline: SPDPipeline, image: np.ndarray, spacing, volume_id: str, name: str) -> tuple[np.ndarray | None, float]:
    """The auto mask of ``name`` (None: the head found no structure) and its seconds."""
    tic = time.perf_counter()
    seg, _, _ = pipeline.segment_learned(image, spacing, volume_id, choose_window(image), name)
    return (None if seg is None else seg.mask), time.perf_counter() - tic


def evaluate(pipeline: SPDPipeline, cases: list[Case], clicks: dict, absent: dict) -> list[dict]:
    """Rows per held-out structure with the served state: auto and clicked Dice, auto seconds, absent voxels."""
    rows = []
    for case in cases:
        for name, value in case.structures.items():
            truth = case.labels == value
            mask, seconds = auto(pipeline, case.image, case.spacing, case.name, name)
            cut, where = absent[case.name, name]
            leftover, _ = auto(pipeline, cut, case.spacing, f"{case.name}-without-{name}", name)
            rows.append({"case": case.name, "structure": name, "auto": 0.0 if mask is None else dice(mask, truth),
                         "auto_seconds": round(seconds, 2), "clicked": clicked(pipeline, case, name, clicks[case.name, name]),
                         "absent_voxels": 0 if leftover is None else int(leftover.sum()), "absent_cut": where,
                         "true_voxels": int(truth.sum())})
            print(f"  {case.name} {name:18s} auto {rows[-1]['auto']:.3f} ({seconds:.1f} s)  clicked {rows[-1]['clicked']:.3f}"
                  f"  absent ({where}): {rows[-1]['absent_voxels']} voxels", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", default="2,4,8", help="labelled-volume counts, one training round each")
    parser.add_argument("--held-out", type=int, default=2)
    parser.add_argument("--labels", default=",".join(RIGHT), help="structures (default: the six right-side ones)")
    parser.add_argument("--crop-margin-mm", default="20,20,10")
    parser.add_argument("--slice-mm", type=float, default=2.5)
    parser.add_argument("--seed", type=int, default=21, help="cohort seed (not one the other benchmarks use)")
    parser.add_argument("--params", default="{}", help="train request params as JSON (default: the trainer's)")
    parser.add_argument("--json", default="", help="write the rows here")
    parser.add_argument("--work", default="", help="a folder kept for later runs with the same cohort arguments, "
                                                   "which reuse its files, embeddings and published models "
                                                   "(default: a temp folder, removed at the end)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="spd_bench_auto_"))
    try:
        run(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    """Train on 2, 4, 8 ... labelled volumes of the cohort in ``work`` and print the held-out table."""
    counts = sorted(int(n) for n in args.labelled.split(","))
    names = [n for n in args.labels.split(",") if n]
    subjects = make_cohort(counts[-1] + args.held_out, args.seed, names,
                           [float(v) for v in args.crop_margin_mm.split(",")], args.slice_mm, prefix=f"auto{args.seed}")
    if not (work / "images").is_dir():  # written once: a rewritten file is a new volume id (embedded again)
        write_cohort(subjects, work / "images", label_dir=work / "labels")
    labelled, held_out = subjects[:counts[-1]], [as_case(s, names) for s in subjects[counts[-1]:]]
    print(f"synthetic cohort in {work}: {len(subjects)} volumes of shape {subjects[0].image.shape}; held out "
          f"{', '.join(c.name for c in held_out)}", flush=True)

    backbone = load_backbone(cache_dir=str(ROOT / "apps" / "spd_sam" / "model" / "runtime"))
    pipeline = SPDPipeline(backbone, EmbeddingCache(4 << 30, work / "eval_cache"), focus=FocusConfig())
    clicks, absent, untrained, ceiling, baseline = {}, {}, {}, {}, {}
    typical = typical_sizes([as_case(s, names) for s in labelled], [CENTRE.view])
    for case in held_out:
        for name, value in case.structures.items():
            rough, _ = clicks_for(case.labels, value, case.spacing, CENTRE, np.random.default_rng([args.seed, value]))
            clicks[case.name, name] = [Click(tuple(c), True) for c in rough]
            absent[case.name, name] = without(case, value)
            untrained[case.name, name] = clicked(pipeline, case, name, clicks[case.name, name])
            truth = case.labels == value
            view = VolumeView(case.image, CENTRE.view, choose_window(case.image))
            ceiling[case.name, name] = dice(decode_boxes(pipeline, case, view, exact_boxes(truth, CENTRE.view)), truth)
            boxes = baseline_boxes(rough, CENTRE.view, case.spacing, typical[name, CENTRE.view])
            baseline[case.name, name] = dice(decode_boxes(pipeline, case, view, boxes), truth)
    print("untrained clicked / exact boxes: " + ", ".join(f"{n} {untrained[k, n]:.3f} / {ceiling[k, n]:.3f}"
                                                         for k, n in untrained), flush=True)

    results = {}
    for n in counts:
        studies, trained = work / f"studies_{n}", work / f"trained_{n}"
        studies.mkdir(exist_ok=True)
        for subject in labelled[:n]:  # links: the same files (volume ids) for every count, embedded once
            link = studies / f"{subject.name}.nii.gz"
            if not link.exists():
                link.symlink_to(work / "images" / f"{subject.name}.nii.gz")
        store = CheckpointStore(trained)
        if store.current() is None:
            seconds, status = train_rounds(work, labelled[:n], json.loads(args.params), 1, studies, trained,
                                           f"server_{n}.log")[0]
            print(f"{n} labelled volumes: round {status['status']} in {seconds:.0f} s", flush=True)
        else:
            seconds = store.metadata().get("seconds", float("nan"))
            print(f"{n} labelled volumes: the model of an earlier run ({trained})", flush=True)
        pipeline.serve(TrainedState())  # each count's model is its own v1: load it in place of the last one
        version = ModelReloader(store, pipeline).refresh()
        print(f"{n} labelled volumes: serving v{version}; work {store.metadata().get('work')}", flush=True)
        results[n] = {"round_seconds": round(seconds), "version": version,
                      "rows": evaluate(pipeline, held_out, clicks, absent) if version else []}
        for row in results[n]["rows"]:
            row["untrained_clicked"] = untrained[row["case"], row["structure"]]
            row["exact_boxes"] = ceiling[row["case"], row["structure"]]
            row["typical_boxes"] = baseline[row["case"], row["structure"]]
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        print(summary(results), flush=True)


def summary(results: dict) -> str:
    lines = ["", "| labelled volumes | round | auto Dice | clicked Dice (trained) | auto / clicked | clicked, untrained "
             "| typical boxes | exact boxes | absent: clean (< 1 %) | auto s per volume |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, result in results.items():
        rows = result["rows"]
        if not rows:
            lines.append(f"| {n} | {result['round_seconds']} s, not published | | | | | | | | |")
            continue
        mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
        clean = sum(r["absent_voxels"] < ABSENT_FRACTION * r["true_voxels"] for r in rows)
        per_volume = np.mean([sum(r["auto_seconds"] for r in rows if r["case"] == c) for c in {r["case"] for r in rows}])
        lines.append(f"| {n} | {result['round_seconds']} s | {mean('auto'):.3f} | {mean('clicked'):.3f} | "
                     f"{mean('auto') / mean('clicked'):.0%} | {mean('untrained_clicked'):.3f} | {mean('typical_boxes'):.3f} | {mean('exact_boxes'):.3f} | "
                     f"{clean} of {len(rows)} | {per_volume:.0f} |")
    last = results[max(results)]["rows"]
    if last:
        lines += ["", f"per structure, {max(results)} labelled volumes (auto / clicked / exact boxes):"]
        lines += [f"  {r['case']} {r['structure']:18s} {r['auto']:.3f} / {r['clicked']:.3f} / {r['exact_boxes']:.3f}"
                  for r in last]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
