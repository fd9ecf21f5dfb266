"""A quick first answer on a cold volume: SPD on the clicked slices only, the slices between them interpolated.

On a CPU nearly all of a first request is the image encoder (about half a second per slice with
LiteMedSAM on two cores). An annotator who clicks every third slice has given the method what it
validates: SPD then runs on the clicked slices alone, as a stack of its own, and the masks of the
slices between two clicked slices are interpolated from theirs (shape-based: the signed distance
to each outline, blended by position). The answer is a draft: the server embeds the rest of the
structure's slices in the background, and the same clicks sent again get the full result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class DraftConfig:
    """When a request is answered with a draft.

    Args:
        min_saved: draft only when at least this many slices of the structure's range, besides the clicked
            ones, still have to be embedded (fewer cost less than the draft saves).
    """

    min_saved: int = 8


def signed_distance(mask: np.ndarray, pixel_mm: Sequence[float]) -> np.ndarray:
    """Distance in mm to the mask's outline: negative inside, positive outside."""
    return (ndimage.distance_transform_edt(~mask, sampling=pixel_mm)
            - ndimage.distance_transform_edt(mask, sampling=pixel_mm))


def fill_between(masks: np.ndarray, picked: Sequence[int], pixel_mm: Sequence[float]) -> np.ndarray:
    """(picked[-1] - picked[0] + 1, H, W) masks: ``masks[n]`` on slice ``picked[n]``, and between two picked slices
    the shape that blends their signed distances by position; an empty slice ends the structure half way to
    its neighbour."""
    out = np.zeros((picked[-1] - picked[0] + 1, *masks.shape[1:]), dtype=bool)
    for n, s in enumerate(picked):
        out[s - picked[0]] = masks[n]
    for n in range(len(picked) - 1):
        a, b, gap = masks[n], masks[n + 1], picked[n + 1] - picked[n]
        if gap < 2 or not (a.any() or b.any()):
            continue
        rows, cols = (np.flatnonzero((a | b).any(axis=1 - k)) for k in range(2))
        crop = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
        da = signed_distance(a[crop], pixel_mm) if a.any() else None
        db = signed_distance(b[crop], pixel_mm) if b.any() else None
        for step in range(1, gap):
            t = step / gap
            if da is not None and db is not None:
                shape = (1 - t) * da + t * db < 0
            else:
                nearer = da if t < 0.5 else db
                if nearer is None:
                    continue
                shape = nearer < 0
            out[picked[n] + step - picked[0]][crop] = shape
    return out
