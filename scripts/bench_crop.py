"""Would small structures gain from segmenting a crop around the clicks at a higher resolution?

For each structure of the **synthetic** MRI subjects (as in ``bench_spd.py``), the slices from the
first to the last click of the centre annotator are segmented twice by plain LiteMedSAM, once
on the whole slice and once on a crop around the clicks (their in-plane bounding box, widened by
the structure's typical size plus a margin, which the encoder then sees at its full 256-pixel
input), each with two prompt sets: the exact box of the true mask on every slice (the ceiling)
and a typical-size box around the nearest click (the baseline). The crop embeds fewer pixels, but
every crop has to be embedded again, so it is only worth it if the Dice gain is clear.

    .venv/bin/python scripts/bench_crop.py [--set tuning|held-out] [--subjects 1] [--margin-mm 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench_spd import CENTRE, SEEDS, baseline_boxes, box_masks, exact_boxes, mri_cases, typical_sizes
from annotator import clicks_for
from lib.spd.runtime import load_backbone
from lib.spd.method import choose_window
from lib.spd.training import dice


def segment(backbone, image: np.ndarray, box_sets: list[dict[int, tuple]], region: tuple[slice, slice], axis: int,
            window) -> list[np.ndarray]:
    """Volume-sized masks, one per set of boxes (slice -> box), with the slices cut to ``region`` (rows, cols);
    every set covers the same slices, which are embedded once."""
    planes = np.stack([np.take(image, s, axis=axis)[region] for s in sorted(box_sets[0])]).astype(np.float32)
    embeddings = backbone.embed(window.apply(planes))
    return [box_masks(backbone, embeddings, boxes, axis, image.shape, region) for boxes in box_sets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SEEDS), default="tuning")
    parser.add_argument("--subjects", type=int, default=1)
    parser.add_argument("--margin-mm", type=float, default=8.0, help="added to the typical size around the clicks")
    args = parser.parse_args()
    backbone = load_backbone()
    tuning = mri_cases(SEEDS["tuning"]["mri"], 2, "both")
    typical = typical_sizes(tuning, (CENTRE.view,))
    cases = mri_cases(SEEDS[args.set]["mri"], args.subjects, "both")
    axis = CENTRE.view
    in_plane = [a for a in range(3) if a != axis]
    rows = []
    print(f"# bench_crop {args.set}, {time.strftime('%Y-%m-%d %H:%M')}, backbone {backbone.name} ({backbone.runtime}), "
          f"synthetic MRI, annotator [{CENTRE.describe()}]")
    print("| structure | crop (px) | whole slice: exact | crop: exact | whole slice: typical box | crop: typical box |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        window = choose_window(case.image)
        for name, value in case.structures.items():
            target = case.labels == value
            rng = np.random.default_rng([value, 0])
            clicks, _ = clicks_for(case.labels, value, case.spacing, CENTRE, rng)
            pixel = np.array([case.spacing[a] for a in in_plane])
            reach = (typical[name, axis] / 2 + args.margin_mm) / pixel
            points = np.array([[c[a] for a in in_plane] for c in clicks], dtype=float)
            lo = np.maximum(points.min(axis=0) - reach, 0).astype(int)
            hi = np.minimum(points.max(axis=0) + reach + 1, [case.image.shape[a] for a in in_plane]).astype(int)
            crop = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
            whole = (slice(0, case.image.shape[in_plane[0]]), slice(0, case.image.shape[in_plane[1]]))
            span = range(min(c[axis] for c in clicks), max(c[axis] for c in clicks) + 1)
            exact = exact_boxes(target, axis)
            exact = {s: exact.get(s, (0, 0, 0, 0)) for s in span}  # no structure there: a point box, nothing found
            typical_boxes = baseline_boxes(clicks, axis, case.spacing, typical[name, axis])
            (we, wt), (ce, ct) = (segment(backbone, case.image, [exact, typical_boxes], region, axis, window)
                                  for region in (whole, crop))
            scores = [dice(m, target) for m in (we, ce, wt, ct)]
            rows.append(scores)
            print(f"| {name} | {hi[0] - lo[0]}x{hi[1] - lo[1]} | {scores[0]:.3f} | {scores[1]:.3f} | {scores[2]:.3f} | "
                  f"{scores[3]:.3f} |", flush=True)
    mean = np.mean(rows, axis=0)
    print(f"| **mean** | | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} | {mean[3]:.3f} |")


if __name__ == "__main__":
    main()
