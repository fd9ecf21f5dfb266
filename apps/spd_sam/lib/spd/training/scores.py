"""Dice scores of masks and their means over labels."""

from __future__ import annotations

from typing import Mapping

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two bool arrays (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def mean_dice(scores: Mapping[str, float]) -> float:
    """Mean over labels (NaN for none)."""
    return float(np.mean(list(scores.values()))) if scores else float("nan")


def format_scores(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) or "no validation volume"
