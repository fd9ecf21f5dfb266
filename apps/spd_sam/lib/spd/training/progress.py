"""What a round records as it goes: epochs, why stages stopped, the clock, the best epoch so far."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..method.saliency_head import SaliencyHead
from ..method.size_prior import SizePrior
from .scores import mean_dice

logger = logging.getLogger(__name__)


@dataclass
class EpochRecord:
    """One epoch of one stage (epoch 0 of the decoder stage is the decoder before tuning)."""

    stage: str  # "saliency" or "decoder"
    epoch: int
    loss: float | None
    val_dice: dict[str, float]
    elapsed_s: float
    detail: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"stage": self.stage, "epoch": self.epoch, "loss": self.loss, "val_dice": self.val_dice,
                "elapsed_s": round(self.elapsed_s, 1), **self.detail}


TIME_BUDGET = "time budget"  # why a stage stopped: the clock; otherwise "max epochs" or "patience"


@dataclass
class TrainingResult:
    """What a round produced: the saliency head, the best decoder weights, the history and the work done."""

    head: SaliencyHead
    decoder_state: dict[str, torch.Tensor] | None
    history: list[EpochRecord]
    val_dice: dict[str, float]  # validation Dice of the full pipeline with the kept decoder epoch
    decoder_epoch: int
    train_volumes: list[str]
    val_volumes: list[str]
    adapters: dict | None = None  # the image encoder's LoRA adapters (``encoder_lora.state``), if it has any
    size_priors: dict[str, SizePrior] = field(default_factory=dict)  # learned from the training volumes' labels
    served_dice: dict[str, float] = field(default_factory=dict)  # the served model on the same validation
    stopped: dict[str, str] = field(default_factory=dict)  # stage -> why it stopped
    skipped_volumes: list[str] = field(default_factory=list)  # training volumes left out for time

    def work(self) -> dict:
        """Epochs and steps per stage, why each stopped, and whether the clock cut the round short."""
        epochs = {stage: sum(1 for r in self.history if r.stage == stage and r.epoch > 0) for stage in self.stopped}
        steps = sum(int(r.detail.get("steps", 0)) for r in self.history if r.stage == "decoder")
        cut = bool(self.skipped_volumes) or TIME_BUDGET in self.stopped.values()
        return {"epochs": epochs, "decoder_steps": steps, "stopped": dict(self.stopped),
                "skipped_volumes": list(self.skipped_volumes), "cut_short": cut}

    def better_than_served(self) -> bool:
        """Whether the round's mean validation Dice is at least the served model's (True when nothing to compare)."""
        if not self.served_dice or not self.val_dice:
            return True
        return round(mean_dice(self.val_dice), 4) >= round(mean_dice(self.served_dice), 4)


class Clock:
    """Seconds since the round started and until its deadline."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.end = self.start + seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self, until: float | None = None) -> float:
        return (self.end if until is None else until) - time.monotonic()


class KeepBest:
    """Early stopping: remembers the best score's epoch and a copy of its state."""

    def __init__(self, patience: int):
        self.patience = patience
        self.score = -np.inf
        self.epoch = -1
        self.state: dict | None = None

    def update(self, score: float, epoch: int, state: Callable[[], dict]) -> None:
        if self.state is None or score > self.score:
            self.score, self.epoch, self.state = score, epoch, copy.deepcopy(state())

    def stop(self, epoch: int) -> bool:
        return epoch - self.epoch >= self.patience
