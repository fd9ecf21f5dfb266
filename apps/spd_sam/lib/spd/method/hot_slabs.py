"""The last few slabs of consecutive slices that requests put on the device, kept there for the next request.

A re-click on a structure asks for the slices it asked for before, or some of them: from a kept slab they
are a view (or, when not consecutive, one gather) on the device, with no copy from the host, no stacking and no
windowing again. Keys name what a slab holds (a view's embeddings, its windowed slices).
"""

from __future__ import annotations

from typing import Sequence

import torch


class HotSlabs:
    """Up to ``size`` slabs, the most recently put first; putting a key replaces its slab."""

    def __init__(self, size: int):
        self.size = size
        self._slabs: tuple[tuple[str, int, torch.Tensor], ...] = ()  # (key, first slice, slab); swapped whole

    def get(self, key: str, slices: Sequence[int]) -> torch.Tensor | None:
        """Slices ``slices`` (ascending) of ``key`` from a kept slab that holds them all; None when none does."""
        for held, start, slab in self._slabs:
            if held == key and start <= slices[0] and slices[-1] < start + len(slab):
                if _consecutive(slices):
                    return slab[slices[0] - start:slices[-1] - start + 1]
                return slab[[s - start for s in slices]]
        return None

    def put(self, key: str, slices: Sequence[int], slab: torch.Tensor) -> None:
        """Keep ``slab``, the data of ``slices``, when they are consecutive."""
        if _consecutive(slices):
            self._slabs = ((key, slices[0], slab), *[h for h in self._slabs if h[0] != key][:self.size - 1])

    def clear(self) -> None:
        self._slabs = ()


def _consecutive(slices: Sequence[int]) -> bool:
    return slices[-1] - slices[0] + 1 == len(slices)
