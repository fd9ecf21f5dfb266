"""Remembers decoded slice masks per prompt, so a re-click decodes only the slices whose prompts changed."""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Callable, Hashable, Sequence

import numpy as np
import torch

from .backbones import PromptBatch


def prompt_key(prompts: PromptBatch, i: int, dense: float | None = None) -> tuple:
    """A hashable summary of slice ``i``'s prompts (coordinates rounded to 1/4 pixel; ``dense`` from
    :func:`dense_digests`)."""
    def rounded(values):
        return None if values is None else tuple(np.round(np.asarray(values[i], dtype=float) * 4).astype(int).ravel())

    return rounded(prompts.boxes), rounded(prompts.points), rounded(prompts.point_labels), dense


def dense_digests(mask_logits) -> list[float]:
    """Per slice, a number that changes with that slice's dense prior: its product with a fixed random
    pattern, in float64 rounded to 12 digits, computed where the priors are (a GPU: no copy to the host)."""
    values = torch.as_tensor(mask_logits)
    sums = torch.einsum("nhw,hw->n", values.double(), _pattern(tuple(values.shape[-2:])).to(values.device))
    return [float(f"{v:.12g}") for v in sums.tolist()]


@lru_cache(maxsize=8)
def _pattern(shape: tuple[int, int]) -> torch.Tensor:
    """The fixed random pattern of :func:`dense_digests` for slices of ``shape``."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


class MaskMemo:
    """LRU of bit-packed slice masks, with the decoder's predicted IoU of each, keyed by (volume view, slice,
    prompts); masks are packed and kept on the device they were decoded on.

    Args:
        max_items: masks kept (a 256x256 mask takes 8 KiB packed).
    """

    def __init__(self, max_items: int = 8192):
        self.max_items = max_items
        self._items: OrderedDict[Hashable, tuple[torch.Tensor, float]] = OrderedDict()
        self._lock = threading.Lock()

    def masks(self, view_key: str, slices: Sequence[int], prompts: PromptBatch, shape: tuple[int, int],
              decode: Callable[[list[int], PromptBatch], tuple[torch.Tensor, np.ndarray]]
              ) -> tuple[torch.Tensor, np.ndarray]:
        """(N, H, W) bool masks (on the decoder's device) and their (N,) predicted IoUs; ``decode(positions,
        prompts_subset)`` runs for the slices not remembered.

        Args:
            view_key: names the volume, axis, backbone and window.
            slices: slice index of each prompt row.
            prompts: one row per entry of ``slices``.
            shape: slice shape.
            decode: returns bool masks (or logits, threshold 0) and predicted IoUs for the given row positions.
        """
        digests = dense_digests(prompts.mask_logits) if prompts.mask_logits is not None else [None] * len(slices)
        keys = [(view_key, s, prompt_key(prompts, i, digests[i])) for i, s in enumerate(slices)]
        scores = np.zeros(len(slices), dtype=np.float32)
        found: dict[int, torch.Tensor] = {}
        with self._lock:
            for i, key in enumerate(keys):
                item = self._items.get(key)
                if item is not None:
                    self._items.move_to_end(key)
                    found[i], scores[i] = item
        todo = [i for i in range(len(slices)) if i not in found]
        decoded = None
        if todo:
            decoded, scores[todo] = decode(todo, prompts.rows(todo))
            decoded = decoded > 0 if decoded.dtype != torch.bool else decoded
            packed = pack_masks(decoded)
            with self._lock:
                for n, i in enumerate(todo):
                    self._items[keys[i]] = (packed[n].clone(), float(scores[i]))
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
        device = decoded.device if decoded is not None else next(iter(found.values())).device
        out = torch.zeros((len(slices), *shape), dtype=torch.bool, device=device)
        if found:
            rows = list(found)
            out[rows] = unpack_masks(torch.stack([found[i] for i in rows]).to(device), shape)
        if decoded is not None:
            out[todo] = decoded
        return out, scores


_BIT_VALUES = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, ceil(H * W / 8)) uint8, eight pixels a byte (first pixel in the high bit), on the
    masks' device."""
    flat = masks.flatten(1)
    flat = torch.cat([flat, flat.new_zeros(len(flat), -flat.shape[1] % 8)], dim=1)
    bits = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=masks.device)
    return (flat.view(len(flat), -1, 8).to(torch.uint8) * bits).sum(-1, dtype=torch.uint8)


def unpack_masks(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_masks`: (N, bytes) uint8 -> (N, H, W) bool."""
    bits = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=packed.device)
    flat = (packed[..., None] & bits).ne(0).flatten(1)
    return flat[:, :shape[0] * shape[1]].reshape(len(packed), *shape)
