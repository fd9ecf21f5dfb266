"""Pairwise Slice Consistency: zero for consistent predictions, grows with flicker the ground truth lacks."""

import numpy as np
import torch

from lib.spd.method.consistency import pairwise_slice_consistency

SHAPE = (48, 48)


def disc(radius: float, centre=(24, 24)) -> torch.Tensor:
    rr, cc = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return torch.from_numpy(((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2).astype(np.float32))


def test_identical_consistent_predictions_cost_nothing():
    truth = torch.stack([disc(8)] * 4)
    assert pairwise_slice_consistency(truth.clone(), truth) == 0
    soft = torch.stack([0.7 * disc(9) + 0.1] * 4)  # imperfect but identical on every slice
    assert pairwise_slice_consistency(soft, truth) == 0


def test_grows_with_inconsistency_the_ground_truth_lacks():
    truth = torch.stack([disc(8), disc(8)])
    losses = [float(pairwise_slice_consistency(torch.stack([disc(8), disc(8, (24, 24 + shift))]), truth))
              for shift in (0, 1, 3, 5)]
    assert losses[0] == 0
    assert all(a < b for a, b in zip(losses, losses[1:])), losses


def test_changes_that_the_ground_truth_has_are_not_penalised():
    truth = torch.stack([disc(5), disc(8), disc(11)])
    assert pairwise_slice_consistency(truth.clone(), truth) == 0
    flicker = torch.stack([disc(5), disc(11), disc(5)])  # changes the ground truth does not have
    assert pairwise_slice_consistency(flicker, truth) > 0


def test_only_near_the_structure():
    truth = torch.stack([disc(6), disc(6)])
    far = disc(3, (5, 5))  # a blob far outside the band around the structure
    probs = torch.stack([disc(6), torch.clamp(disc(6) + far, 0, 1)])
    assert pairwise_slice_consistency(probs, truth, band_px=4) == 0
    assert pairwise_slice_consistency(probs, truth, band_px=30) > 0


def test_gradients_and_degenerate_stacks():
    truth = torch.stack([disc(6), disc(6)])
    logits = torch.zeros(2, *SHAPE, requires_grad=True)
    loss = pairwise_slice_consistency(torch.sigmoid(logits + torch.stack([disc(6), disc(4)])), truth)
    loss.backward()
    assert loss > 0 and logits.grad.abs().sum() > 0
    assert pairwise_slice_consistency(torch.rand(1, *SHAPE), truth[:1]) == 0
