"""Anchor masks validated against the adjacent anchors: a structure continues from slice to slice.

Each anchored slice's mask is probed on its own, around its consensus point. Where rough clicks
drift between touching neighbours (bowel loops), a run of anchors can take a neighbour, or fat, or
the structure merged with a neighbour, although the anchors before them had the structure alone.
For a structure of steady size (tubes), adjacent anchors *link* when their masks overlap (IoU) and
both masks have that size. The longest run of linked anchors is trusted. Going outward from it, an
anchor that does not link to the last trusted anchor is probed again around the centre of that
anchor's mask, and the probe mask that links best is taken; the anchor is then trusted. Where no
probe mask links, the chain ends: that anchor and those beyond it keep their own masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .box_probing import iou, size_gap


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

    def sized(self, mask: np.ndarray) -> bool:
        return size_gap(mask, self.typical) <= np.log(self.config.size_ratio)

    def links(self, a: np.ndarray, b: np.ndarray) -> bool:
        return iou(a, b) >= self.config.min_iou and self.sized(a) and self.sized(b)

    def longest_run(self, masks: dict[int, np.ndarray]) -> list[int]:
        """The longest run of consecutive anchors (by slice) that link from each to the next."""
        order = sorted(masks)
        runs = [[order[0]]]
        for s, t in zip(order, order[1:]):
            if self.links(masks[s], masks[t]):
                runs[-1].append(t)
            else:
                runs.append([t])
        return max(runs, key=len)

    def follow(self, masks: dict[int, np.ndarray],
               reprobe: Callable[[int, np.ndarray], tuple[Sequence[np.ndarray], np.ndarray]]
               ) -> dict[int, tuple[np.ndarray, int]]:
        """Re-probe the anchors outside the longest run that do not link to the trusted anchor before them.

        Args:
            masks: anchored slice -> its probed mask (bool, H x W); updated with the masks taken.
            reprobe: ``reprobe(slice, centre)`` -> (probe masks on that slice around a point near ``centre``,
                that point).

        Returns:
            slice -> (the point its new mask was probed around, the trusted anchor it links to).
        """
        run = self.longest_run(masks)
        if len(run) < self.config.min_run:
            return {}
        order = sorted(masks)
        after, before = order[order.index(run[-1]) + 1:], order[:order.index(run[0])][::-1]
        moved = {}
        for trusted, outward in ((run[-1], after), (run[0], before)):
            for s in outward:
                reference = masks[trusted]
                if not self.links(reference, masks[s]):
                    candidates, centre = reprobe(s, np.argwhere(reference).mean(axis=0))
                    fitting = [m for m in candidates if self.links(reference, m)]
                    if not fitting:  # the chain breaks here: farther anchors are not judged by a distant one
                        break
                    masks[s] = max(fitting, key=lambda m: iou(reference, m))
                    moved[s] = (centre, trusted)
                trusted = s
        return moved
