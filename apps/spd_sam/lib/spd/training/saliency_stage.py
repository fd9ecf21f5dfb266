"""Stage 1: the saliency head, fitted on the embeddings of labelled slabs (Dice + focal loss per grid cell)."""

from __future__ import annotations

import copy
import logging
from typing import Mapping, Sequence

import numpy as np
import torch

from ..method.saliency_head import SaliencyHead, grid_targets
from .config import TrainConfig
from .data import Slab
from .distributed import Rank
from .losses import saliency_loss
from .progress import TIME_BUDGET, Clock, EpochRecord, KeepBest
from .scores import dice, format_scores, mean_dice

logger = logging.getLogger(__name__)


def _stack_slabs(slabs: Sequence[Slab], labels: Mapping[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N, C, g, g) and soft grid targets (N, L, g, g) of every slab slice."""
    if not slabs:
        return torch.zeros(0), torch.zeros(0)
    grid = slabs[0].embeddings.shape[-1]
    embeddings = torch.cat([s.embeddings for s in slabs])
    targets = torch.cat([torch.stack([grid_targets(s.masks(v), grid) for v in labels.values()], dim=1) for s in slabs])
    return embeddings, targets.half()


def grid_dice(head: SaliencyHead, embeddings: torch.Tensor, targets: torch.Tensor, chunk: int = 32) -> dict[str, float]:
    """Dice per label of the thresholded saliency against the half-covered grid cells."""
    head.eval()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(head(embeddings[i:i + chunk])) for i in range(0, len(embeddings), chunk)])
    pred, truth = (probs > 0.5).numpy(), (targets.float() > 0.5).numpy()
    return {name: dice(pred[:, c], truth[:, c]) for c, name in enumerate(head.labels)}


def train_saliency_head(train: Sequence[Slab], val: Sequence[Slab], labels: Mapping[str, int], axis: int,
                        config: TrainConfig, clock: Clock, deadline: float, ranks: Rank = Rank(),
                        start: SaliencyHead | None = None, stage: str = "saliency"
                        ) -> tuple[SaliencyHead, list[EpochRecord], str]:
    """Stage 1: fit a head for ``labels`` (name -> value) on the slabs (slices along ``axis``); keeps the best
    validation epoch. Returns the head, the history and why the stage stopped.

    ``start``: a head for the same labels to continue from (default: a new one); ``stage``: its name
    in the history and the log."""
    torch.manual_seed(config.seed)
    head = copy.deepcopy(start) if start is not None else SaliencyHead(list(labels), axis=axis)
    net = ranks.wrap(head)
    info = logger.info if ranks.main else logger.debug
    x, y = _stack_slabs(train, labels)
    val_x, val_y = _stack_slabs(val, labels) if val else (x, y)
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.head_lr, weight_decay=1e-4)
    rng = np.random.default_rng(config.seed)
    best, history, stopped = KeepBest(config.head_patience), [], "max epochs"
    for epoch in range(1, config.head_epochs + 1):
        if not ranks.all_agree(clock.left(deadline) > 0):
            info("%s: time budget reached before epoch %d", stage, epoch)
            stopped = TIME_BUDGET
            break
        head.train()
        losses = []
        order = torch.from_numpy(rng.permutation(len(x)))  # the same on every rank: same seed
        for batch in ranks.shard([order[s:s + config.head_batch] for s in range(0, len(x), config.head_batch)]):
            if not ranks.all_agree(clock.left(deadline) > 0):
                break
            loss = saliency_loss(net(x[batch]), y[batch].float())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        if not losses:
            stopped = TIME_BUDGET
            break
        scores = grid_dice(head, val_x, val_y)
        best.update(mean_dice(scores), epoch, head.state_dict)
        loss = float(np.mean(ranks.gather(float(np.mean(losses)))))
        history.append(EpochRecord(stage, epoch, loss, scores, clock.elapsed()))
        info("%s epoch %d/%d: loss %.4f; val Dice (grid) %s; mean %.3f (best %.3f at epoch %d) [%.0f s]",
             stage, epoch, config.head_epochs, loss, format_scores(scores), mean_dice(scores), best.score, best.epoch, clock.elapsed())
        if best.stop(epoch):
            info("%s: no better validation Dice for %d epochs; stopping", stage, config.head_patience)
            stopped = "patience"
            break
    if best.state is not None:
        head.load_state_dict(best.state)
    return head.eval(), history, stopped
