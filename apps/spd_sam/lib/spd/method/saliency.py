"""Saliency: where the target plausibly is, per slice.

Before any label has been trained, :class:`AppearanceSaliency` builds the map from image
appearance alone: the intensity of the clicked voxels and the similarity of the SAM embedding to
the embedding under the clicks. The pipeline adds the points where the line of the other clicks
puts each click (clicks that drift scatter around a structure; their line runs near its middle),
and the intensity is modelled on the densest half of all these samples, so clicks that drifted off
the structure, even nearly half of them, do not steer it. Trained per-label heads plug in through
the same :class:`SaliencyModel` interface.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F


class SaliencyModel(Protocol):
    """Predicts a saliency map in [0, 1] per slice."""

    def __call__(
        self, images: torch.Tensor, embeddings: torch.Tensor, clicks: Sequence[tuple[int, float, float]]
    ) -> torch.Tensor:
        """(N, H, W) float32 maps on the embeddings' device. Args: images (N, H, W) in [0, 1] on that device;
        embeddings (N, C, g, g); clicks (batch index, row, col): the clicks and the points their cross-slice line puts
        on the clicked slices."""


def embedding_grid_to_slice(grid: torch.Tensor, slice_shape: tuple[int, int]) -> torch.Tensor:
    """Resample (N, g, g) maps on the embedding grid to (N, H, W) slice pixels.

    The backbones resize a slice's longest side to their input size and pad bottom/right, so the
    slice covers the top-left ``H/max(H,W)`` x ``W/max(H,W)`` of the grid.
    """
    height, width = slice_shape
    g = grid.shape[-1]
    rows = max(1, round(g * height / max(height, width)))
    cols = max(1, round(g * width / max(height, width)))
    valid = grid[:, None, :rows, :cols].float()
    return F.interpolate(valid, size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def _grid_index(row: float, col: float, slice_shape: tuple[int, int], g: int) -> tuple[int, int]:
    scale = g / max(slice_shape)
    return min(int(row * scale), g - 1), min(int(col * scale), g - 1)


def densest_half(values: np.ndarray) -> tuple[float, float]:
    """Centre and spread of the shortest interval that holds half of ``values`` (the shorth).

    Clicks that drift off a structure land on whatever surrounds it: their intensities scatter or
    form a second cluster (fat around a bowel loop). The median of all clicks then lies between
    the clusters, and their MAD spans both; the densest half stays inside the larger cluster.
    The spread is the interval's length over 1.349, the length a normal distribution's half takes.
    """
    ordered = np.sort(values)
    half = ordered.size // 2 + 1
    lengths = ordered[half - 1:] - ordered[: ordered.size - half + 1]
    start = int(np.argmin(lengths))
    return float(np.median(ordered[start:start + half])), float(lengths[start]) / 1.349


class AppearanceSaliency:
    """Label-agnostic saliency from click intensity and embedding similarity.

    Args:
        patch: half-size in pixels of the patch whose median gives a click's intensity.
        min_sigma: floor of the intensity spread, in normalised units.
    """

    def __init__(self, patch: int = 1, min_sigma: float = 0.04):
        self.patch = patch
        self.min_sigma = min_sigma

    def __call__(
        self, images: torch.Tensor, embeddings: torch.Tensor, clicks: Sequence[tuple[int, float, float]]
    ) -> torch.Tensor:
        assert clicks, "appearance saliency needs at least one click"
        intensity = self._intensity_likelihood(torch.as_tensor(images, device=embeddings.device), clicks)
        similarity = self._embedding_similarity(embeddings, clicks, images.shape[1:])
        return (intensity * similarity).sqrt_()

    def _intensity_likelihood(self, images: torch.Tensor, clicks) -> torch.Tensor:
        """(N, H, W) likelihood of each pixel's intensity under the clicked intensities, where ``images`` are."""
        p = self.patch
        at = torch.tensor([(n, int(round(row)), int(round(col))) for n, row, col in clicks], device=images.device)
        offsets = torch.arange(-p, p + 1, device=images.device)
        rows, cols = at[:, 1:2] + offsets, at[:, 2:3] + offsets  # each click's patch, cut where the slice ends
        height, width = images.shape[1:]
        inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None]
        patches = images[at[:, :1, None], rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
        values, inside = patches.flatten(1).cpu().numpy(), inside.flatten(1).cpu().numpy()  # a few pixels per click
        centre, sigma = densest_half(np.array([np.median(v[keep]) for v, keep in zip(values, inside)]))
        sigma = max(sigma, self.min_sigma)
        z = (images - centre) / sigma
        return torch.exp(-0.125 * z * z)  # exp(-z^2 / 2 / 4): 2-sigma wide, tolerant to partial volume

    def _embedding_similarity(self, embeddings: torch.Tensor, clicks, slice_shape, chunk_bytes: int = 8 << 20
                              ) -> torch.Tensor:
        g = embeddings.shape[-1]
        cells = [(n, *_grid_index(r, c, slice_shape, g)) for n, r, c in clicks]
        vectors = F.normalize(torch.stack([embeddings[n, :, gr, gc].float() for n, gr, gc in cells]), dim=1)
        reference = F.normalize(vectors.median(dim=0).values, dim=0)
        flat = embeddings.flatten(2)  # (N, C, g*g): channel sums as matrix products, the fast path on a CPU
        count, channels, size = flat.shape
        # float32 copies of a few slices at a time in one buffer that stays in cache: chunks of 16 slices (64 MB)
        # took 10x as long on a 2-core VM, mostly allocating and faulting pages
        step = max(1, chunk_bytes // (channels * size * 4))
        buffer = torch.empty(min(step, count), channels, size, device=embeddings.device)
        ones = torch.ones_like(reference)
        cosine = torch.empty(count, size, device=embeddings.device)
        for start in range(0, count, step):
            part = buffer[:min(step, count - start)].copy_(flat[start:start + step])
            dots = reference @ part
            cosine[start:start + step] = dots * (ones @ part.mul_(part)).clamp_min(1e-12).rsqrt()
        cosine = cosine.view(-1, g, g)
        high = float(torch.stack([cosine[n, gr, gc] for n, gr, gc in cells]).median())
        low = float(cosine.median())
        scaled = ((cosine - low) / max(high - low, 1e-3)).clamp(0.0, 1.0)
        return embedding_grid_to_slice(scaled, slice_shape).clamp(0.0, 1.0)
