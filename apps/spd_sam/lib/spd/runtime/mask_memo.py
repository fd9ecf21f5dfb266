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
    prompts).

    Args:
        max_items: masks kept (a 256x256 mask takes 8 KiB packed).
    """

    def __init__(self, max_items: int = 8192):
        self.max_items = max_items
        self._items: OrderedDict[Hashable, tuple[np.ndarray, float]] = OrderedDict()
        self._lock = threading.Lock()

    def masks(self, view_key: str, slices: Sequence[int], prompts: PromptBatch, shape: tuple[int, int],
              decode: Callable[[list[int], PromptBatch], tuple[np.ndarray, np.ndarray]]
              ) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) bool masks and their (N,) predicted IoUs; ``decode(positions, prompts_subset)`` runs for the
        slices not remembered.

        Args:
            view_key: names the volume, axis, backbone and window.
            slices: slice index of each prompt row.
            prompts: one row per entry of ``slices``.
            shape: slice shape.
            decode: returns logits and predicted IoUs for the given row positions.
        """
        digests = dense_digests(prompts.mask_logits) if prompts.mask_logits is not None else [None] * len(slices)
        keys = [(view_key, s, prompt_key(prompts, i, digests[i])) for i, s in enumerate(slices)]
        out = np.zeros((len(slices), *shape), dtype=bool)
        scores = np.zeros(len(slices), dtype=np.float32)
        todo = []
        with self._lock:
            for i, key in enumerate(keys):
                item = self._items.get(key)
                if item is None:
                    todo.append(i)
                else:
                    self._items.move_to_end(key)
                    out[i] = np.unpackbits(item[0], count=shape[0] * shape[1]).reshape(shape).astype(bool)
                    scores[i] = item[1]
        if todo:
            logits, scores[todo] = decode(todo, prompts.rows(todo))
            out[todo] = logits > 0
            with self._lock:
                for i in todo:
                    self._items[keys[i]] = (np.packbits(out[i]), float(scores[i]))
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
        return out, scores
