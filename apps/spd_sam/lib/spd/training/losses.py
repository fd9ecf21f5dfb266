"""Segmentation losses on logits: soft Dice, focal and binary cross-entropy."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, dims: Sequence[int], smooth: float = 1.0) -> torch.Tensor:
    """Mean of ``1 - Dice`` over the dimensions not reduced.

    Args:
        logits: raw scores.
        target: soft or hard targets in [0, 1], same shape.
        dims: dimensions summed into one Dice value (e.g. the pixels of a slice).
        smooth: added to numerator and denominator, so an empty target with an empty prediction costs 0.
    """
    probs = torch.sigmoid(logits)
    overlap = (probs * target).sum(dim=tuple(dims))
    total = probs.sum(dim=tuple(dims)) + target.sum(dim=tuple(dims))
    return (1.0 - (2.0 * overlap + smooth) / (total + smooth)).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean binary focal loss: cross-entropy down-weighted by ``(1 - p_t) ** gamma`` on easy pixels."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-ce)
    return ((1.0 - p_true) ** gamma * ce).mean()


def dice_bce_per_slice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice per slice plus pixel-wise binary cross-entropy, for (N, H, W) slice logits."""
    return soft_dice_loss(logits, target, dims=(-2, -1)) + F.binary_cross_entropy_with_logits(logits, target)


def saliency_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice per label (over the batch) plus focal loss, for (N, L, g, g) logits and soft targets."""
    return soft_dice_loss(logits, targets, dims=(0, 2, 3)) + focal_loss(logits, targets)
