"""Anchor masks validated against the adjacent anchors: a structure continues from slice to slice.

Each anchored slice's mask is probed on its own, around its consensus point. Where rough clicks
drift between touching neighbours (bowel loops), a run of anchors can take a neighbour, or fat, or
the structure merged with a neighbour, although the anchors before them had the structure alone.
For a structure of steady size (tubes), adjacent anchors *link* when their masks overlap (IoU) and
both masks have that size. The longest run of linked anchors is trusted. Going outward from it, an
anchor that does not link to the last trusted anchor is probed again around the centre of that
anchor's mask, and the probe mask that links best is taken; the anchor is then trusted. Where no
probe mask links, the chain ends: that anchor and those beyond it keep their own masks.

Masks are torch tensors on any device (numpy masks are taken as they are); each link test comes to
the host in one piece: the links of all adjacent anchors at once, then one per re-probed anchor and per anchor
after one that moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .box_probing import Masks, areas, as_masks, iou, size_gap


@dataclass(frozen=True)
class ChainConfig:
    """When adjacent anchors' masks link: IoU at least ``min_iou`` and each area within ``size_ratio`` of the
    structure's steady size; a run of fewer than ``min_run`` linked anchors is no evidence."""

    min_iou: float = 0.5
    size_ratio: float = 1.5
    min_run: int = 3


class AnchorChain:
    """Links between anchor masks, for a structure of steady ``typical`` area in pixels."""

    def __init__(self, typical: float, config: ChainConfig = ChainConfig()):
        self.typical, self.config = typical, config

    def sized(self, area: int) -> bool:
        """Whether a mask of ``area`` pixels has the structure's steady size."""
        return size_gap(area, self.typical) <= np.log(self.config.size_ratio)

    def link_ious(self, a: torch.Tensor, b: torch.Tensor) -> list[float | None]:
        """For each pair of masks of two (N, H, W) stacks, their IoU where they link (IoU at least ``min_iou``,
        both masks of the steady size), else None."""
        linked = []
        for overlap, area_a, area_b in torch.stack([areas(a & b), areas(a), areas(b)], 1).tolist():
            ratio = iou(overlap, area_a, area_b)
            linked.append(ratio if ratio >= self.config.min_iou and self.sized(area_a) and self.sized(area_b) else None)
        return linked

    def adjacent_links(self, masks: dict[int, Masks]) -> dict[tuple[int, int], float | None]:
        """The link of each anchor to the next (by slice): (slice, next slice) -> :meth:`link_ious`."""
        order = sorted(masks)
        stack = as_masks([masks[s] for s in order])
        return dict(zip(zip(order, order[1:]), self.link_ious(stack[:-1], stack[1:])))

    def follow(self, masks: dict[int, Masks],
               reprobe: Callable[[int, np.ndarray], tuple[Masks | Sequence[Masks], np.ndarray]]
               ) -> dict[int, tuple[np.ndarray, int]]:
        """Re-probe the anchors outside the longest run that do not link to the trusted anchor before them.

        Args:
            masks: anchored slice -> its probed mask (bool, H x W; torch or numpy); updated with the masks taken
                (torch, on the probes' device).
            reprobe: ``reprobe(slice, centre)`` -> (probe masks on that slice around a point near ``centre``,
                that point).

        Returns:
            slice -> (the point its new mask was probed around, the trusted anchor it links to).
        """
        order, links = sorted(masks), self.adjacent_links(masks)
        run = _longest_run(order, links)
        if len(run) < self.config.min_run:
            return {}
        after, before = order[order.index(run[-1]) + 1:], order[:order.index(run[0])][::-1]
        moved = {}
        for trusted, outward in ((run[-1], after), (run[0], before)):
            for s in outward:  # the trusted anchor is always the adjacent one: its link is known unless it moved
                reference = torch.as_tensor(masks[trusted])
                linked = (links[min(trusted, s), max(trusted, s)] if trusted not in moved
                          else self.link_ious(reference[None], torch.as_tensor(masks[s])[None])[0])
                if linked is None:
                    probed, centre = reprobe(s, _centre(reference))
                    candidates = as_masks(probed)
                    overlaps = self.link_ious(reference.expand_as(candidates), candidates)
                    fitting = [i for i, overlap in enumerate(overlaps) if overlap is not None]
                    if not fitting:  # the chain breaks here: farther anchors are not judged by a distant one
                        break
                    masks[s] = candidates[max(fitting, key=lambda i: overlaps[i])]
                    moved[s] = (centre, trusted)
                trusted = s
        return moved


def _longest_run(order: list[int], links: dict[tuple[int, int], float | None]) -> list[int]:
    """The longest run of consecutive anchors (``order``: by slice) that link from each to the next (``links``:
    :meth:`AnchorChain.adjacent_links`)."""
    runs = [[order[0]]]
    for pair in zip(order, order[1:]):
        if links[pair] is not None:
            runs[-1].append(pair[1])
        else:
            runs.append([pair[1]])
    return max(runs, key=len)


def _centre(mask: torch.Tensor) -> np.ndarray:
    """The mean (row, col) of a mask's pixels, exactly as numpy takes it: their index sums over their count."""
    rows, cols = mask.sum(1, dtype=torch.int16), mask.sum(0, dtype=torch.int16)  # int16: see :func:`areas`
    count, row_sum, col_sum = torch.stack([rows.sum(), (rows * torch.arange(len(rows), device=mask.device)).sum(),
                                           (cols * torch.arange(len(cols), device=mask.device)).sum()]).tolist()
    return np.array([row_sum, col_sum]) / count
