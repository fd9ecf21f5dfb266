"""The saliency head: learns a trivial task in a few steps and serves maps through the SaliencyModel interface."""

import numpy as np
import torch

from lib.spd.method.saliency import embedding_grid_to_slice
from lib.spd.method.saliency_head import SaliencyHead, grid_targets
from lib.spd.training.losses import saliency_loss
from lib.spd.training.saliency_stage import grid_dice

GRID, CHANNELS = 16, 8


def synthetic_batch(rng: np.random.Generator, count: int = 8):
    """Embeddings whose channel 0 lights up on a random square: label "a" is that square, "b" never occurs."""
    embeddings = torch.from_numpy(rng.normal(0, 0.3, (count, CHANNELS, GRID, GRID)).astype(np.float32))
    targets = torch.zeros(count, 2, GRID, GRID)
    for n in range(count):
        r, c = rng.integers(0, GRID - 5, 2)
        embeddings[n, 0, r:r + 5, c:c + 5] += 1.5
        targets[n, 0, r:r + 5, c:c + 5] = 1.0
    return embeddings, targets


def test_head_learns_a_trivial_task_in_a_few_steps():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    head = SaliencyHead(["a", "b"], in_channels=CHANNELS, width=16)
    optimiser = torch.optim.AdamW(head.parameters(), lr=3e-3)
    x_val, y_val = synthetic_batch(rng, 8)
    before = grid_dice(head, x_val, y_val)["a"]
    for _ in range(40):
        x, y = synthetic_batch(rng)
        loss = saliency_loss(head(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    scores = grid_dice(head, x_val, y_val)
    assert scores["a"] > 0.9 > before, (before, scores)
    assert scores["b"] == 1.0, "an absent label is predicted absent"


def test_label_saliency_serves_slice_maps_in_unit_range():
    head = SaliencyHead(["a", "b"], in_channels=CHANNELS, width=8)
    images = np.zeros((3, 40, 20), dtype=np.float32)
    maps = head.for_label("b")(images, torch.randn(3, CHANNELS, GRID, GRID), [(0, 5.0, 5.0)])
    assert maps.shape == (3, 40, 20) and maps.dtype == torch.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0


def test_grid_targets_invert_the_slice_mapping():
    mask = np.zeros((2, 40, 20), dtype=bool)
    mask[:, 10:30, 5:15] = True
    grid = grid_targets(mask, GRID)
    assert grid.shape == (2, GRID, GRID)
    assert grid[:, :, GRID // 2:].sum() == 0, "the slice covers the left half of the grid; the rest is padding"
    back = embedding_grid_to_slice(grid, (40, 20)) > 0.5
    overlap = (back.numpy() & mask).sum() / mask.sum()
    assert overlap > 0.8
