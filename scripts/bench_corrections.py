"""Annotation effort with corrective clicks: SPD sessions that correct their result vs SPD re-run from scratch.

Protocol of interactive-segmentation papers: after the first result from rough clicks (``annotator.py``: every 3rd
slice, 3 mm drift, 15 % off target, axial), each next click goes to the deepest point of the largest 3D error
region, positive where the mask missed and negative where it leaked (``annotator.corrective_click``), up to
``--clicks`` clicks; ``--clicker inner``: to a random point of that region's inner half instead. Each method places its clicks on its own errors:
- **corrections**: one interaction session (``lib.spd.method.interaction``), all clicks resent each time as the
  viewers do; only the new click acts on the kept result.
- **from scratch**: the SPD pipeline on the whole click list each time.
Printed: mean Dice after each click, NoC@80 / NoC@85 (clicks to reach that Dice; ``--clicks`` when never reached),
the share of clicks that lowered Dice by more than 0.01, seconds per click, and the exact-box ceiling (the untrained
backbone from the true box on every slice). ``--trained`` serves a published model (``bench_training.py`` prints
the folder it trained into). Data (all **synthetic**, held out unless ``--set tuning``): as
``bench_spd.py`` (warped Colin27 + AAL subjects, CT tube phantoms).

    .venv/bin/python scripts/bench_corrections.py [--set held-out] [--data mri,tubes] [--subjects 1] [--clicks 10]
    .venv/bin/python scripts/bench_corrections.py --data mri --trained <trained_dir>   # a model bench_training.py trained
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from app_path import ROOT  # noqa: F401  (first: it puts the app folder and scripts/ on sys.path)

from annotator import corrective_click, clicks_for
from bench_spd import CENTRE, SEEDS, decode_boxes, exact_boxes, mri_cases, tube_cases
from lib.spd.method import Click, Interactions, SPDPipeline, VolumeView, choose_window
from lib.spd.runtime import load_backbone
from lib.spd.serving import CheckpointStore, EmbeddingCache, ModelReloader
from lib.spd.training import dice

METHODS = ("corrections", "from scratch")


def noc(curve: list[float], level: float, cap: int) -> int:
    """Clicks after the first result until Dice reaches ``level`` (``cap`` when it never does)."""
    return next((n for n, d in enumerate(curve) if d >= level), cap)


def ceiling(case, value: int, pipeline: SPDPipeline) -> float:
    """Dice of the backbone from the true box on every slice."""
    truth = case.labels == value
    view = VolumeView(case.image, CENTRE.view, choose_window(case.image))
    return dice(decode_boxes(pipeline, case, view, exact_boxes(truth, CENTRE.view)), truth)


def run_case(case, name: str, value: int, pipeline: SPDPipeline, interactions: Interactions, clicks: int, seed,
             exact: float, clicker: str = "deepest", methods=METHODS) -> dict:
    truth, window = case.labels == value, choose_window(case.image)
    rough, _ = clicks_for(case.labels, value, case.spacing, CENTRE, np.random.default_rng(seed))
    first = [Click(tuple(c), True) for c in rough]
    row = {"case": case.name, "structure": name, "ceiling": exact}
    for method in methods:
        given, curve, seconds = list(first), [], []
        rng = np.random.default_rng(seed) if clicker == "inner" else None  # each method from the same seed
        for n in range(clicks + 1):
            tic = time.perf_counter()
            if method == "corrections":
                mask = interactions.run((case.name, name), case.image, case.spacing, case.name, given, window,
                                        label=name, slice_axis=CENTRE.view).segmentation.mask
            else:
                mask = pipeline.segment(case.image, case.spacing, case.name, given, window, label=name,
                                        slice_axis=CENTRE.view).mask
            if n:
                seconds.append(time.perf_counter() - tic)
            curve.append(dice(mask, truth))
            nxt = corrective_click(mask, truth, case.spacing, rng)
            if nxt is None or n == clicks:
                curve += [curve[-1]] * (clicks - n)
                break
            given.append(Click(tuple(nxt[0]), nxt[1]))
        row[method] = {"dice": curve, "seconds": seconds,
                       "clicks": [[list(c.ijk), c.positive] for c in given[len(first):]]}
    return row


def summary(rows: list[dict], clicks: int, methods=METHODS) -> str:
    lines = ["| method | " + " | ".join(f"{n}" for n in range(clicks + 1)) + " | NoC@80 | NoC@85 | reached 85 | "
             "clicks lowering Dice > 0.01 | mean change per click | s per click |",
             "|---|" + "---|" * (clicks + 1) + "---|---|---|---|---|---|"]
    for method in methods:
        curves = np.array([r[method]["dice"] for r in rows])
        steps = np.diff(curves, axis=1)
        secs = [s for r in rows for s in r[method]["seconds"]]
        lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in curves.mean(0))
                     + f" | {np.mean([noc(list(c), 0.80, clicks) for c in curves]):.1f}"
                     f" | {np.mean([noc(list(c), 0.85, clicks) for c in curves]):.1f}"
                     f" | {sum(noc(list(c), 0.85, clicks + 1) <= clicks for c in curves)} of {len(rows)}"
                     f" | {(steps < -0.01).mean():.1%} | {steps.mean():+.3f} | {np.median(secs) if secs else 0:.2f} |")
    lines.append(f"\nexact-box ceiling (untrained backbone, true box on every slice): "
                 f"{np.mean([r['ceiling'] for r in rows]):.3f}")
    lines += ["", "| structure | ceiling | " + " | ".join(f"{m}: 0 -> 5 -> 10 clicks" for m in methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for r in rows:
        curves = [r[m]["dice"] for m in methods]
        lines.append(f"| {r['case']} {r['structure']} | {r['ceiling']:.3f} | " + " | ".join(
            f"{d[0]:.3f} -> {d[min(5, clicks)]:.3f} -> {d[-1]:.3f}" for d in curves) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SEEDS), default="held-out")
    parser.add_argument("--data", default="mri,tubes", help="comma-separated: mri, tubes")
    parser.add_argument("--subjects", type=int, default=1, help="MRI subjects (6 structures each, sides alternate)")
    parser.add_argument("--clicks", type=int, default=10, help="corrective clicks after the first result")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--clicker", choices=["deepest", "inner"], default="deepest",
                        help="where a corrective click goes in the largest error: its deepest point, or a random "
                             "point of its inner half")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "spd_bench_cache",
                        help="embedding cache kept between runs")
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    parser.add_argument("--trained", type=Path, default=None,
                        help="a trained-models folder (the server's trained_dir): serve its newest published model")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods: choose from {', '.join(METHODS)}")
    started = time.strftime("%Y-%m-%d %H:%M")
    backbone = load_backbone(cache_dir=str(args.cache / "runtime"))
    pipeline = SPDPipeline(backbone, EmbeddingCache(3 << 30, args.cache / "embeddings"))
    cases = []
    if "mri" in args.data:
        cases += mri_cases(SEEDS[args.set]["mri"], args.subjects, None)
    if "tubes" in args.data:
        cases += tube_cases(SEEDS[args.set]["tubes"])
    exact = {(c.name, v): ceiling(c, v, pipeline) for c in cases for v in c.structures.values()}  # untrained
    version = ModelReloader(CheckpointStore(args.trained), pipeline).refresh() if args.trained else None
    if args.trained and version is None:
        parser.error(f"{args.trained} holds no published model")
    interactions = Interactions(pipeline)
    rows = []
    for case in cases:
        for name, value in case.structures.items():
            row = run_case(case, name, value, pipeline, interactions, args.clicks, [value, len(rows)],
                           exact[case.name, value], args.clicker, methods)
            rows.append(dict(row, data="tubes" if case.name.startswith("tubes") else "mri"))
            print(f"{case.name} {name}: " + " | ".join(f"{m} " + " ".join(f"{d:.2f}" for d in row[m]["dice"])
                                                        for m in methods) + f" | ceiling {row['ceiling']:.2f}", flush=True)
    print(f"\n# bench_corrections {args.set}, clicker {args.clicker}, started {started}, "
          f"backbone {backbone.name} ({backbone.runtime}), "
          f"{f'trained model v{version} of {args.trained}' if version else 'untrained'}, all data synthetic, "
          "simulated annotator")
    for data in ("mri", "tubes"):
        part = [r for r in rows if r["data"] == data]
        if part:
            print(f"\n## {'synthetic MRI (Colin27 + AAL, warped)' if data == 'mri' else 'synthetic CT tube phantom'}"
                  f" ({len(part)} structures)\n\n{summary(part, args.clicks, methods)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
