"""Accuracy of SPD from weak clicks against the best plain-SAM use of the same clicks, over a grid of annotators.

For every structure and every simulated annotator (``annotator.py``: click spacing, drift, off-target
rate, skipped slices, view axis) three things are measured in the same run, with the same backbone:
- **SPD**: the pipeline as the server runs it, untrained (slice axis chosen from the clicks); with
  ``--size-prior`` its box probes follow the sizes learned from the tuning subjects' labels, as
  they do after a training round.
- **baseline**: plain SAM as a user would drive it with these clicks: a box of the structure's
  typical in-plane size around each click, every slice from the first to the last click segmented
  with the box of the nearest clicked slice. Typical sizes are medians over the tuning subjects.
- **ceiling**: plain SAM from the exact bounding box of the structure on every slice.
With ``--draft``, also the draft (``draft.py``) that a cold volume gets first from the same clicks.

Data (all **synthetic**): MRI subjects made from Colin27 + AAL (``make_cohort.py``: elastic warp,
bias field, contrast change, noise), and CT phantoms of touching, crossing tubes (``tube_phantom.py``).
``--set tuning`` and ``--set held-out`` use disjoint seeds; tune on the first, report the second.

    .venv/bin/python scripts/bench_spd.py --set held-out [--data mri,tubes] [--grid full|quick|centre|spacing] [--draft]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from app_path import ROOT  # first: it puts the app folder and scripts/ on sys.path

from annotator import Annotator, clicks_for
from lib.spd.runtime import PromptBatch, load_backbone
from lib.spd.serving import EmbeddingCache
from lib.spd.method import choose_window
from lib.spd.method.draft import DraftConfig
from lib.spd.method.focus import FocusConfig
from lib.spd.method import SPDPipeline, VolumeView
from lib.spd.method import Click
from lib.spd.method import learn_size_prior
from lib.spd.method import TrainedState
from lib.spd.training import dice
from make_cohort import make_cohort
from tube_phantom import make_tube_phantom

LABELS = json.loads((ROOT / "apps" / "spd_sam" / "labels.json").read_text())
SEEDS = {"tuning": {"mri": 11, "tubes": (1,)}, "held-out": {"mri": 12, "tubes": (2, 3)}}
CENTRE = Annotator(every=3, drift_mm=3.0, off_target=0.15, skip=0.0, view=2)
GRIDS = {
    "centre": [CENTRE],
    "full": [CENTRE, CENTRE.but(drift_mm=0.0), CENTRE.but(drift_mm=6.0), CENTRE.but(every=2), CENTRE.but(every=6),
             CENTRE.but(off_target=0.0), CENTRE.but(off_target=0.30), CENTRE.but(skip=0.25),
             CENTRE.but(view=1), CENTRE.but(view=0)],
    "quick": [CENTRE, CENTRE.but(drift_mm=6.0), CENTRE.but(off_target=0.30)],  # for tuning on axial slices
    "tubes": [CENTRE, CENTRE.but(drift_mm=6.0), CENTRE.but(off_target=0.30), CENTRE.but(every=2)],
    "spacing": [CENTRE, CENTRE.but(every=2), CENTRE.but(every=6), CENTRE.but(drift_mm=6.0)],  # the draft's grid
}


@dataclass
class Case:
    """One volume with labelled structures to click on."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    structures: dict[str, int]  # name -> label value


def mri_cases(seed: int, count: int, side: str | None) -> list[Case]:
    subjects = make_cohort(count, seed=seed, prefix=f"bench{seed}")
    cases = []
    for n, s in enumerate(subjects):
        spacing = tuple(float(v) for v in np.sqrt((s.affine[:3, :3] ** 2).sum(axis=0)))
        # alternate sides between subjects unless one is asked for: every structure kind, half the cost
        pick = side or ("right" if n % 2 == 0 else "left")
        structures = {k: v for k, v in LABELS.items() if pick == "both" or k.startswith(pick)}
        cases.append(Case(s.name, s.image, s.label, spacing, structures))
    return cases


def tube_cases(seeds) -> list[Case]:
    cases = []
    for seed in seeds:
        p = make_tube_phantom(seed)
        cases.append(Case(f"tubes{seed}", p.image, p.labels, p.spacing, {p.names[v]: v for v in (1, 2, 3)}))
    return cases


def hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """95th percentile Hausdorff distance in mm, on the box holding both masks (nan when one is empty)."""
    if not a.any() or not b.any():
        return float("nan")
    both = np.argwhere(a | b)
    box = tuple(slice(max(lo - 2, 0), hi + 3) for lo, hi in zip(both.min(0), both.max(0)))
    a, b = a[box], b[box]
    pred = torch.from_numpy(np.stack([~a, a]))[None].float()
    true = torch.from_numpy(np.stack([~b, b]))[None].float()
    return float(compute_hausdorff_distance(pred, true, percentile=95, spacing=list(spacing))[0, 0])


def in_plane_extent_mm(mask: np.ndarray, axis: int, spacing) -> np.ndarray:
    """Median (rows, cols) extent in mm of a structure's bounding box over the slices along ``axis``."""
    in_plane = [a for a in range(3) if a != axis]
    sizes = [(r1 - r0 + 1, c1 - c0 + 1) for r0, c0, r1, c1 in exact_boxes(mask, axis).values()]
    return np.median(np.array(sizes), axis=0) * np.array([spacing[a] for a in in_plane])


def box_masks(backbone, embeddings, boxes: dict[int, tuple], axis: int, volume_shape, region=None) -> np.ndarray:
    """Plain SAM: the masks of one box per slice (slice -> (r0, c0, r1, c1), volume coordinates) stacked into a
    volume; ``embeddings`` are of the sorted slices cut to ``region`` ((rows, cols) slices; None: whole slices)."""
    mask = np.zeros(volume_shape, dtype=bool)
    if not boxes:
        return mask
    in_plane = [a for a in range(3) if a != axis]
    region = region or tuple(slice(0, volume_shape[a]) for a in in_plane)
    h, w = region[0].stop - region[0].start, region[1].stop - region[1].start
    slices = sorted(boxes)
    offset = np.array([region[0].start, region[1].start] * 2, dtype=np.float32)
    clipped = np.clip(np.array([boxes[s] for s in slices], dtype=np.float32) - offset, 0, [h - 1, w - 1] * 2)
    masks = np.concatenate([backbone.decode(embeddings[n:n + 16], PromptBatch(boxes=clipped[n:n + 16]), (h, w),
                                            binary=True) for n in range(0, len(slices), 16)])
    for s, m in zip(slices, masks):
        index = [slice(None)] * 3
        index[axis] = s
        mask[tuple(index)][region] = m
    return mask


def decode_boxes(pipeline: SPDPipeline, case: Case, view: VolumeView, boxes: dict[int, tuple]) -> np.ndarray:
    """Plain SAM on whole slices (embeddings through the pipeline's cache): see :func:`box_masks`."""
    embeddings = pipeline.embed(case.name, view, sorted(boxes)) if boxes else None
    return box_masks(pipeline.backbone, embeddings, boxes, view.axis, case.labels.shape)


def baseline_boxes(clicks, axis: int, spacing, typical_mm: np.ndarray) -> dict[int, tuple]:
    """A typical-size box around each click, carried to every slice up to the next click (nearest clicked slice)."""
    in_plane = [a for a in range(3) if a != axis]
    half = typical_mm / 2 / np.array([spacing[a] for a in in_plane])
    by_slice = {}
    for c in clicks:  # the first click of a slice gives its box
        by_slice.setdefault(c[axis], (c[in_plane[0]], c[in_plane[1]]))
    clicked = np.array(sorted(by_slice))
    boxes = {}
    for s in range(clicked[0], clicked[-1] + 1):
        r, c = by_slice[int(clicked[np.argmin(np.abs(clicked - s))])]
        boxes[s] = (r - half[0], c - half[1], r + half[0], c + half[1])
    return boxes


def exact_boxes(mask: np.ndarray, axis: int) -> dict[int, tuple]:
    boxes = {}
    for s in np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))):
        rows, cols = np.nonzero(np.take(mask, s, axis=axis))
        boxes[int(s)] = (rows.min(), cols.min(), rows.max(), cols.max())
    return boxes


def typical_sizes(cases: list[Case], views) -> dict[tuple[str, int], np.ndarray]:
    """(structure, view) -> median in-plane box size in mm over ``cases`` (what a plain-SAM user knows)."""
    out = {}
    for view in views:
        for name in {n for c in cases for n in c.structures}:
            found = [in_plane_extent_mm(c.labels == c.structures[name], view, c.spacing)
                     for c in cases if name in c.structures]
            out[name, view] = np.median(np.array(found), axis=0)
    return out


def size_priors(cases: list[Case], view: int) -> dict:
    """Per structure, the size prior a round would learn from these cases' labels (``--size-prior``)."""
    names = {n for c in cases for n in c.structures}
    return {n: learn_size_prior([(c.labels == c.structures[n], c.spacing) for c in cases if n in c.structures], view)
            for n in names}


def run(cases: list[Case], grid: list[Annotator], typical, pipeline: SPDPipeline, trials: int, log,
        priors: dict | None = None, drafter: SPDPipeline | None = None) -> list[dict]:
    """One row per structure, annotator and trial; ``drafter`` (a pipeline that always drafts) adds the Dice of the
    draft a cold volume would get first."""
    rows = []
    for case in cases:
        window = choose_window(case.image)
        ceilings = {}
        for g, annotator in enumerate(grid):
            for name, value in case.structures.items():
                target = case.labels == value
                view = VolumeView(case.image, annotator.view, window)
                if (name, annotator.view) not in ceilings:
                    exact = decode_boxes(pipeline, case, view, exact_boxes(target, annotator.view))
                    ceilings[name, annotator.view] = (dice(exact, target), hd95(exact, target, case.spacing))
                for trial in range(trials):
                    rng = np.random.default_rng([int(case.name.encode().hex(), 16) % 2**32, value, g, trial])
                    clicks, off = clicks_for(case.labels, value, case.spacing, annotator, rng)
                    if priors is not None:
                        pipeline.serve(TrainedState(size_priors=priors[annotator.view]))
                    tic = time.perf_counter()
                    seg = pipeline.segment(case.image, case.spacing, case.name, [Click(tuple(c), True) for c in clicks],
                                           window, label=name)
                    spd_s = time.perf_counter() - tic
                    base = decode_boxes(pipeline, case, view, baseline_boxes(clicks, annotator.view, case.spacing,
                                                                             typical[name, annotator.view]))
                    changed = {c["click"] for status in ("moved", "rejected") for c in seg.consensus[status]}
                    row = {"case": case.name, "structure": name, "grid": g, "annotator": annotator.describe(),
                           "trial": trial, "clicks": len(clicks), "off_target": int(sum(off)),
                           "changed": len(changed), "changed_off_target": sum(1 for c in changed if off[c]),
                           "axis": seg.axis, "spd_dice": dice(seg.mask, target),
                           "spd_hd95": hd95(seg.mask, target, case.spacing), "base_dice": dice(base, target),
                           "base_hd95": hd95(base, target, case.spacing), "ceiling_dice": ceilings[name, annotator.view][0],
                           "ceiling_hd95": ceilings[name, annotator.view][1], "spd_s": spd_s}
                    if drafter is not None:
                        draft = drafter.segment(case.image, case.spacing, case.name,
                                                [Click(tuple(c), True) for c in clicks], window, label=name, draft=True)
                        row["draft_dice"] = dice(draft.mask, target) if draft.draft is not None else float("nan")
                    rows.append(row)
                    log(f"  {case.name:12s} {name:18s} [{annotator.describe()}] clicks {len(clicks):2d} "
                        f"(off {row['off_target']}, changed {row['changed']}/{row['changed_off_target']} off) "
                        f"axis {seg.axis}  SPD {row['spd_dice']:.3f}  base {row['base_dice']:.3f}  "
                        f"ceiling {row['ceiling_dice']:.3f}  ({spd_s:.1f} s)"
                        + (f"  draft {row['draft_dice']:.3f}" if drafter is not None else ""))
    return rows


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def summary(rows: list[dict], grid: list[Annotator]) -> str:
    drafts = any("draft_dice" in r for r in rows)
    lines = ["| annotator | n | SPD Dice | baseline Dice | SPD - baseline | ceiling Dice | SPD HD95 | baseline HD95 "
             "| axis flips | clicks changed (off-target) |" + (" SPD draft Dice |" if drafts else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if drafts else "")]
    for g, annotator in enumerate(grid):
        part = [r for r in rows if r["grid"] == g]
        if not part:
            continue
        spd, base = _mean(r["spd_dice"] for r in part), _mean(r["base_dice"] for r in part)
        flips = sum(1 for r in part if r["axis"] != annotator.view)
        changed = sum(r["changed"] for r in part)
        lines.append(f"| {annotator.describe()} | {len(part)} | {spd:.3f} | {base:.3f} | {spd - base:+.3f} | "
                     f"{_mean(r['ceiling_dice'] for r in part):.3f} | {_mean(r['spd_hd95'] for r in part):.1f} | "
                     f"{_mean(r['base_hd95'] for r in part):.1f} | {flips} | {changed} "
                     f"({sum(r['changed_off_target'] for r in part)} of {sum(r['off_target'] for r in part)}) |"
                     + (f" {_mean(r['draft_dice'] for r in part):.3f} |" if drafts else ""))
    centre = [r for r in rows if r["grid"] == 0]
    lines += ["", f"Per structure at [{grid[0].describe()}]:", "",
              "| structure | SPD Dice | baseline Dice | ceiling Dice |", "|---|---|---|---|"]
    for name in sorted({r["structure"] for r in centre}):
        part = [r for r in centre if r["structure"] == name]
        lines.append(f"| {name} | {_mean(r['spd_dice'] for r in part):.3f} | {_mean(r['base_dice'] for r in part):.3f}"
                     f" | {_mean(r['ceiling_dice'] for r in part):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SEEDS), default="held-out")
    parser.add_argument("--data", default="mri,tubes", help="comma-separated: mri, tubes")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full", help="annotators for the MRI subjects")
    parser.add_argument("--subjects", type=int, default=2, help="MRI subjects")
    parser.add_argument("--side", choices=["left", "right", "both"], default=None,
                        help="MRI structures per subject (default: sides alternate between subjects)")
    parser.add_argument("--trials", type=int, default=1, help="click draws per structure and annotator")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "spd_bench_cache",
                        help="embedding cache kept between runs")
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    parser.add_argument("--no-focus", action="store_true", help="SPD on whole slices instead of a region around the clicks")
    parser.add_argument("--draft", action="store_true",
                        help="also the draft a cold volume would get first (draft.py), from the same clicks")
    parser.add_argument("--size-prior", action="store_true",
                        help="SPD probes with the sizes learned from the tuning subjects' labels, as after a round")
    args = parser.parse_args(argv)
    data = args.data.split(",")
    started = time.strftime("%Y-%m-%d %H:%M")

    backbone = load_backbone(cache_dir=str(args.cache / "runtime"))
    pipeline = SPDPipeline(backbone, EmbeddingCache(3 << 30, args.cache / "embeddings"),
                           focus=None if args.no_focus else FocusConfig())
    drafter = SPDPipeline(backbone, pipeline.cache, focus=pipeline.focus, draft=DraftConfig(min_saved=0)) \
        if args.draft else None  # drafts whatever is cached
    log = lambda text: print(text, flush=True)  # noqa: E731
    reports, all_rows = [], []
    if "mri" in data:
        tuning = mri_cases(SEEDS["tuning"]["mri"], args.subjects, "both")
        typical = typical_sizes(tuning, (0, 1, 2))
        cases = tuning if args.set == "tuning" else mri_cases(SEEDS[args.set]["mri"], args.subjects, args.side)
        if args.set == "tuning" and args.side != "both":
            cases = mri_cases(SEEDS["tuning"]["mri"], args.subjects, args.side)
        log(f"MRI ({args.set}): {len(cases)} synthetic subjects, {sum(len(c.structures) for c in cases)} structures")
        priors = {v: size_priors(tuning, v) for v in (0, 1, 2)} if args.size_prior else None
        rows = run(cases, GRIDS[args.grid], typical, pipeline, args.trials, log, priors, drafter)
        reports.append(("synthetic MRI (Colin27 + AAL, warped)", summary(rows, GRIDS[args.grid])))
        all_rows += [dict(r, data="mri") for r in rows]
    if "tubes" in data:
        tuning = tube_cases(SEEDS["tuning"]["tubes"])
        typical = typical_sizes(tuning, (2,))
        cases = tuning if args.set == "tuning" else tube_cases(SEEDS[args.set]["tubes"])
        log(f"tube phantom CT ({args.set}): {len(cases)} phantoms")
        priors = {2: size_priors(tuning, 2)} if args.size_prior else None
        rows = run(cases, GRIDS["tubes"], typical, pipeline, args.trials, log, priors, drafter)
        reports.append(("synthetic CT tube phantom", summary(rows, GRIDS["tubes"])))
        all_rows += [dict(r, data="tubes") for r in rows]

    print(f"\n# bench_spd {args.set}, started {started}, backbone {backbone.name} ({backbone.runtime}), "
          f"all data synthetic, simulated annotators")
    for title, table in reports:
        print(f"\n## {title}\n\n{table}")
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=1))


if __name__ == "__main__":
    main()
