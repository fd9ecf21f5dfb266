"""Trained saliency: a small conv head on the SAM image embedding, one logit map per label.

The head sees the (C, g, g) embedding of a slice plus two channels of grid coordinates (so it can
tell a left structure from its mirror image) and predicts, per label, where that structure is on
the g x g embedding grid. :class:`LabelSaliency` serves one label's map through the
:class:`~lib.spd.saliency.SaliencyModel` interface, upsampled to slice pixels; :class:`GridMemo` remembers its
maps per slice for the clicks that follow.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .saliency import embedding_grid_to_slice

PRIOR_LOGIT = -4.6  # initial logit of every cell: probability about 0.01


class SaliencyHead(nn.Module):
    """Embedding (N, C, g, g) -> logits (N, L, g, g), one channel per label.

    Args:
        labels: label names, in channel order.
        in_channels: embedding channels (256 for every SAM-family backbone here).
        width: hidden channels.
        axis: the slice axis it was trained on (None: unknown); it is served on slices of that axis only.
    """

    def __init__(self, labels: Sequence[str], in_channels: int = 256, width: int = 48, axis: int | None = None):
        super().__init__()
        assert labels, "a saliency head needs at least one label"
        self.labels = list(labels)
        self.in_channels = in_channels
        self.width = width
        self.axis = axis
        self.net = nn.Sequential(
            nn.Conv2d(in_channels + 2, width, 1), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, len(self.labels), 1),
        )
        nn.init.constant_(self.net[-1].bias, PRIOR_LOGIT)  # start near "absent", as structures are small

    def config(self) -> dict:
        """Constructor arguments (plain types, for checkpoints)."""
        return {"labels": list(self.labels), "in_channels": self.in_channels, "width": self.width, "axis": self.axis}

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        n, _, h, w = embeddings.shape
        rows = torch.linspace(-1.0, 1.0, h, device=embeddings.device).view(1, 1, h, 1).expand(n, 1, h, w)
        cols = torch.linspace(-1.0, 1.0, w, device=embeddings.device).view(1, 1, 1, w).expand(n, 1, h, w)
        return self.net(torch.cat([embeddings.float(), rows, cols], dim=1))

    def for_label(self, name: str) -> "LabelSaliency":
        """The saliency model of one label (shares this head's weights)."""
        return LabelSaliency(self, self.labels.index(name))

    def serves(self, axis: int) -> bool:
        """Whether its maps mean anything on slices along ``axis`` (the one it was trained on)."""
        return self.axis is None or self.axis == axis


class LabelSaliency:
    """One label's channel of a :class:`SaliencyHead`, as a ``SaliencyModel``; clicks are not used.

    Args:
        head: the trained head.
        channel: the label's channel.
        chunk_bytes: float32 embeddings per forward pass (a few slices: chunks of 16 took 3x as long on a 2-core
            VM, their copies too large to stay in cache).
    """

    def __init__(self, head: SaliencyHead, channel: int, chunk_bytes: int = 8 << 20):
        self.head = head
        self.channel = channel
        self.chunk_bytes = chunk_bytes

    def __call__(self, images: torch.Tensor, embeddings: torch.Tensor, clicks: Sequence[tuple[int, float, float]]
                 ) -> torch.Tensor:
        return self.to_slices(self.grids(embeddings), tuple(images.shape[1:]))

    def grids(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, g, g) float32 probabilities on the embedding grid, on the head's device."""
        self.head.eval()
        device = next(self.head.parameters()).device
        grids = []
        step = max(1, self.chunk_bytes // (embeddings[0].numel() * 4)) if len(embeddings) else 1
        with torch.inference_mode():
            for start in range(0, len(embeddings), step):
                logits = self.head(embeddings[start:start + step].to(device))
                grids.append(torch.sigmoid(logits[:, self.channel]).float())
        return torch.cat(grids) if grids else torch.zeros(0, *embeddings.shape[-2:], device=device)

    @staticmethod
    def to_slices(grids: torch.Tensor, slice_shape: tuple[int, int]) -> torch.Tensor:
        """(N, g, g) grid maps -> (N, H, W) float32 maps in [0, 1] on slice pixels, on the grids' device."""
        return embedding_grid_to_slice(grids, slice_shape).clamp(0.0, 1.0)


class GridMemo:
    """LRU of a trained head's grid maps per (view key, label, slice): a click on slices seen before runs no head.

    Args:
        max_items: maps kept (16 KiB each on a 64 x 64 grid).
    """

    def __init__(self, max_items: int = 4096):
        self.max_items = max_items
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def grids(self, key: tuple, slices: Sequence[int], compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """(N, g, g) maps of ``slices`` under ``key``; ``compute(positions)`` gives those of the slices at these
        positions of ``slices`` that are not remembered."""
        with self._lock:
            found = [self._items.get((*key, s)) for s in slices]
            for s, grid in zip(slices, found):
                if grid is not None:
                    self._items.move_to_end((*key, s))
        todo = [i for i, grid in enumerate(found) if grid is None]
        if todo:
            computed = compute(todo)
            with self._lock:
                for i, grid in zip(todo, computed):
                    found[i] = self._items[(*key, slices[i])] = grid
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
        return torch.stack(found)


def grid_targets(masks: np.ndarray, grid: int) -> torch.Tensor:
    """(N, H, W) masks -> (N, g, g) fraction of each embedding cell covered (zero on the padding).

    The inverse of :func:`~lib.spd.saliency.embedding_grid_to_slice`: the slice covers the
    top-left ``H/max(H,W)`` x ``W/max(H,W)`` of the grid.
    """
    n, height, width = masks.shape
    rows = max(1, round(grid * height / max(height, width)))
    cols = max(1, round(grid * width / max(height, width)))
    covered = F.interpolate(torch.from_numpy(masks.astype(np.float32))[:, None], size=(rows, cols), mode="area")
    return F.pad(covered, (0, grid - cols, 0, grid - rows))[:, 0]

