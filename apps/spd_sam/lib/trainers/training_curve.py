"""The training curve of one round as a PNG: loss and validation Dice per epoch, per stage."""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lib.spd.training import EpochRecord


def render_training_curve(history: Sequence[EpochRecord], title: str) -> bytes:
    """PNG bytes with one column per stage: training loss (top) and validation Dice per label (bottom)."""
    stages = [s for s in ("saliency", "decoder", "saliency refit") if any(r.stage == s for r in history)]
    figure, axes = plt.subplots(2, max(len(stages), 1), figsize=(5 * max(len(stages), 1), 6), squeeze=False)
    for column, stage in enumerate(stages):
        records = [r for r in history if r.stage == stage]
        trained = [r for r in records if r.loss is not None]
        loss_axis, dice_axis = axes[0, column], axes[1, column]
        loss_axis.plot([r.epoch for r in trained], [r.loss for r in trained], marker="o")
        loss_axis.set_title(f"{stage}: training loss")
        for label in sorted({k for r in records for k in r.val_dice}):
            points = [(r.epoch, r.val_dice[label]) for r in records if label in r.val_dice]
            dice_axis.plot(*zip(*points), marker="o", label=label)
        dice_axis.set_title(f"{stage}: validation Dice" + (" (embedding grid)" if stage.startswith("saliency") else ""))
        dice_axis.set_xlabel("epoch")
        dice_axis.set_ylim(0, 1)
        if records and records[0].val_dice:
            dice_axis.legend(fontsize="x-small", ncol=2, loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()
