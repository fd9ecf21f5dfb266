"""The full pipeline's Dice on held-out volumes, with clicks fixed per volume and label."""

from __future__ import annotations

import logging
import time
from typing import Mapping, Sequence

import numpy as np

from ..method.pipeline import SPDPipeline
from .click_simulation import ClickStyle
from .config import TrainConfig
from .data import LabelledVolume, clicks_for
from .distributed import Rank
from .scores import dice

logger = logging.getLogger(__name__)


def validate(pipeline: SPDPipeline, volumes: Sequence[LabelledVolume], labels: Mapping[str, int], axis: int,
             config: TrainConfig, deadline: float = float("inf"), ranks: Rank = Rank(), focus: bool = False
             ) -> dict[str, float] | None:
    """Dice per label of the full pipeline on ``volumes``, with clicks fixed per volume and label.

    ``focus``: decode in regions around the structures as serving does; a round validates on whole
    slices (its slabs' embeddings), since embedding every structure's region again would cost a CPU
    round most of its budget.

    Ranks segment their share of the structures and every rank gets all the scores. Returns None
    when the deadline (``time.monotonic()``) passes on any rank before its structures are segmented.
    """
    pipeline.decoder_changed()
    style = ClickStyle(max(config.click_every), config.drift_mm, config.off_target)
    jobs = [(n, volume, name) for n, volume in enumerate(volumes) for name in volume.present(labels)]
    complete, mine = True, []
    for n, volume, name in jobs[ranks.rank::ranks.world]:
        if time.monotonic() > deadline:
            complete = False
            break
        rng = np.random.default_rng([config.seed, n, labels[name]])
        clicks = clicks_for(volume, labels[name], axis, style, rng)
        seg = pipeline.segment(volume.volume, volume.spacing, volume.volume_id, clicks, volume.window,
                               label=name, slice_axis=axis, focus=focus)
        mine.append((name, dice(seg.mask, volume.labels == labels[name])))
    gathered = ranks.gather((complete, mine))
    if not all(done for done, _ in gathered):
        return None
    scores: dict[str, list[float]] = {}
    for name, score in (item for _, part in gathered for item in part):
        scores.setdefault(name, []).append(score)
    return {name: float(np.mean(v)) for name, v in scores.items()}
