"""Pairwise Slice Consistency (PSC): adjacent slices should agree where their ground truth agrees.

For each pair of adjacent slices the loss is the mean squared difference of the predicted
probabilities over the pixels where (a) the two ground-truth masks agree and (b) the pixel lies
near the structure (within a band around the union of the two masks). Changes that the ground
truth has between the slices cost nothing; identical predictions cost nothing; flicker between
slices that the anatomy does not have is penalised, locally, where it matters for the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def structure_band(truth: torch.Tensor, band_px: int) -> torch.Tensor:
    """(N, H, W) bool: pixels within ``band_px`` (Chebyshev distance) of the mask."""
    if band_px <= 0:
        return truth.bool()
    size = 2 * band_px + 1
    return F.max_pool2d(truth.float()[:, None], size, stride=1, padding=band_px)[:, 0] > 0


def pairwise_slice_consistency(probs: torch.Tensor, truth: torch.Tensor, band_px: int = 4) -> torch.Tensor:
    """PSC over consecutive pairs of an (N, H, W) stack of adjacent slices.

    Args:
        probs: predicted foreground probabilities in [0, 1], slices in order, adjacent.
        truth: ground-truth masks (bool or {0, 1}) of the same slices.
        band_px: width of the local band around the structure, in pixels.

    Returns:
        Scalar loss (0 for fewer than two slices or no pixel to compare).
    """
    assert probs.shape == truth.shape and probs.ndim == 3, (
        f"probs and truth must be the same (N, H, W) shape, got {tuple(probs.shape)} and {tuple(truth.shape)}")
    if probs.shape[0] < 2:
        return probs.sum() * 0.0
    truth = truth.bool()
    agree = truth[1:] == truth[:-1]
    near = structure_band(truth[1:] | truth[:-1], band_px)
    weight = (agree & near).float()
    difference = (probs[1:] - probs[:-1]) ** 2
    per_pair = (weight * difference).sum(dim=(-2, -1)) / weight.sum(dim=(-2, -1)).clamp_min(1.0)
    return per_pair.mean()
