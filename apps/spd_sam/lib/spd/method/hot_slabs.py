"""The last few slabs of consecutive slices that requests put on the device, kept there for the next request.

A re-click on a structure asks for the slices it asked for before, or some of them: from a kept slab they
are a view (or, when not consecutive, one gather) on the device, with no copy from the host, no stacking and no
windowing again. Keys name what a slab holds (a view's embeddings, its windowed slices).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class HotSlabs:
    """Up to ``size`` slabs of at most ``budget_bytes`` in all, the most recently put first; putting a key replaces
    its slab, and a slab over the budget is not kept."""

    def __init__(self, size: int, budget_bytes: int = 1 << 30):
        self.size, self.budget_bytes = size, budget_bytes
        self._slabs: tuple[tuple[str, int, torch.Tensor], ...] = ()  # (key, first slice, slab); swapped whole

    def get(self, key: str, slices: Sequence[int]) -> torch.Tensor | None:
        """Slices ``slices`` (ascending) of ``key`` from a kept slab that holds them all; None when none does."""
        for held, start, slab in self._slabs:
            if held == key and start <= slices[0] and slices[-1] < start + len(slab):
                if _consecutive(slices):
                    return slab[slices[0] - start:slices[-1] - start + 1]
                return slab[[s - start for s in slices]]
        return None

    def fetch(self, key: str, slices: Sequence[int], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """:meth:`get`, else ``make()`` (the data of ``slices``), which is then :meth:`put`."""
        slab = self.get(key, slices)
        if slab is None:
            slab = make()
            self.put(key, slices, slab)
        return slab

    def put(self, key: str, slices: Sequence[int], slab: torch.Tensor) -> None:
        """Keep ``slab``, the data of ``slices``, when they are consecutive and it fits the budget; older slabs stay
        as long as they fit beside it."""
        if not _consecutive(slices) or slab.nbytes > self.budget_bytes:
            return
        kept, room = [(key, slices[0], slab)], self.budget_bytes - slab.nbytes
        for held in self._slabs:
            if len(kept) < self.size and held[0] != key and held[2].nbytes <= room:
                kept.append(held)
                room -= held[2].nbytes
        self._slabs = tuple(kept)

    def clear(self) -> None:
        self._slabs = ()


def _consecutive(slices: Sequence[int]) -> bool:
    return slices[-1] - slices[0] + 1 == len(slices)
