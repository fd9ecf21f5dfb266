"""SPD training loops, framework-free: stage 1 (saliency head) and stage 2 (mask decoder with PSC).

Stage 1 trains one :class:`SaliencyHead` for all labels on the embeddings of labelled slices
(every slice of a structure plus a margin of slices without it) with Dice + focal loss.

Stage 2 fine-tunes the backbone's mask decoder (image encoder frozen) on the prompts that SPD
itself produces at inference: each step simulates fresh clinical clicks on a training structure
(one every k slices, drifting, some off target) and runs the pipeline's plan (trained saliency ->
CPD -> boxes carried between anchored slices), with the anchored slices' boxes measured as a
perfect decoder would let box calibration measure them. The decoder then learns its two jobs:
a run of adjacent slices from their consensus boxes (Dice + BCE per slice + lambda * PSC over
adjacent pairs), and the whole structure from calibration's square probes (Dice + BCE).
Validation segments the held-out volumes with the full pipeline (real calibration) each epoch;
the best epoch is kept (epoch 0, the decoder as it was, included). The served model (its heads and
decoder, as the round found them) is validated on the same volumes and clicks first, so the
publisher can refuse a round that is worse than what it would replace. The result records how
much work the round did (epochs, steps, why each stage stopped), since a time-bounded round on a
loaded machine does less.

Under DDP (``ranks`` of :class:`~.distributed.Ranks`) every rank takes its share of slice batches,
training steps, validation segmentations and slabs to embed; the head and the decoder are wrapped
in DistributedDataParallel, so all ranks hold the same weights after every step.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from . import encoder_lora
from .backbones import Backbone
from .box_calibration import probe_boxes
from .click_simulation import ClickStyle
from .consistency import pairwise_slice_consistency
from .decoder_tuning import DifferentiableDecoder
from .distributed import Ranks
from .embedding_cache import EmbeddingCache
from .losses import dice_bce_per_slice
from .pipeline import Plan, SPDPipeline
from .saliency_head import SaliencyHead, grid_targets, saliency_loss
from .size_prior import SizePrior, learn_size_prior
from .training_data import LabelledVolume, Slab, clicks_for, embed_slab, ideal_anchor_boxes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Limits and hyper-parameters of one training round.

    Args:
        max_epochs: decoder epochs at most.
        max_seconds: wall-clock budget of the whole round, embedding included.
        train_seconds: budget of the two training stages once the slices are embedded (so that a round
            whose embeddings are cached is short), within ``max_seconds``.
        patience: decoder epochs without a better validation Dice before stage 2 stops.
        head_epochs: saliency head epochs at most (cheap: one pass over the slab embeddings each).
        head_patience: saliency head epochs without a better validation Dice before stage 1 stops.
        head_lr: learning rate of the saliency head.
        head_batch: slices per saliency step.
        decoder_lr: learning rate of the mask decoder.
        psc_weight: lambda of the PSC term.
        psc_band_mm: width of PSC's band around the structure.
        slices_per_step: adjacent slices decoded per decoder step.
        probes_per_step: calibration probes decoded per decoder step.
        click_every: click spacings (slices) that simulated annotators use, drawn per step.
        drift_mm: RMS distance of simulated clicks from the centre line.
        off_target: fraction of simulated clicks on the nearest other structure.
        seed: seed of click simulation and shuffling.
        lora_rank: rank of LoRA adapters on the image encoder's attention projections, trained with the
            decoder in stage 2 (0: the encoder stays frozen; SAM ViT backbones only).
        lora_alpha: LoRA scale numerator (the update is scaled by ``lora_alpha / lora_rank``).
        lora_lr: learning rate of the adapters.
    """

    max_epochs: int = 20
    max_seconds: float = 720.0
    train_seconds: float = 270.0
    patience: int = 4
    head_epochs: int = 60
    head_patience: int = 8
    head_lr: float = 2e-3
    head_batch: int = 16
    decoder_lr: float = 3e-5
    psc_weight: float = 0.5
    psc_band_mm: float = 4.0
    slices_per_step: int = 8
    probes_per_step: int = 4
    click_every: tuple[int, ...] = (2, 3)
    drift_mm: float = 3.0
    off_target: float = 0.15
    seed: int = 0
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_lr: float = 1e-4


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


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two bool arrays (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def mean_dice(scores: Mapping[str, float]) -> float:
    """Mean over labels (NaN for none)."""
    return float(np.mean(list(scores.values()))) if scores else float("nan")


def _fmt(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) or "no validation volume"


# --------------------------------------------------------------------------- stage 1: saliency head
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
                        config: TrainConfig, clock: Clock, deadline: float, ranks: Ranks = Ranks(),
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
             stage, epoch, config.head_epochs, loss, _fmt(scores), mean_dice(scores), best.score, best.epoch, clock.elapsed())
        if best.stop(epoch):
            info("%s: no better validation Dice for %d epochs; stopping", stage, config.head_patience)
            stopped = "patience"
            break
    if best.state is not None:
        head.load_state_dict(best.state)
    return head.eval(), history, stopped


# --------------------------------------------------------------------------- stage 2: mask decoder
def validate(pipeline: SPDPipeline, volumes: Sequence[LabelledVolume], labels: Mapping[str, int], axis: int,
             config: TrainConfig, deadline: float = float("inf"), ranks: Ranks = Ranks(), focus: bool = False
             ) -> dict[str, float] | None:
    """Dice per label of the full pipeline on ``volumes``, with clicks fixed per volume and label.

    ``focus``: decode in regions around the structures as serving does; a round validates on whole
    slices (its slabs' embeddings), since embedding every structure's region again would cost a CPU
    round most of its budget.

    Ranks segment their share of the structures and every rank gets all the scores. Returns None
    when the deadline (``time.monotonic()``) passes on any rank before its structures are segmented.
    """
    pipeline.decoder_changed()
    style = ClickStyle(max(config.click_every), config.drift_mm, config.off_target)
    jobs = [(n, volume, name) for n, volume in enumerate(volumes) for name in volume.present(labels)]
    complete, mine = True, []
    for n, volume, name in jobs[ranks.rank::ranks.world]:
        if time.monotonic() > deadline:
            complete = False
            break
        rng = np.random.default_rng([config.seed, n, labels[name]])
        clicks = clicks_for(volume, labels[name], axis, style, rng)
        seg = pipeline.segment(volume.volume, volume.spacing, volume.volume_id, clicks, volume.window,
                               label=name, slice_axis=axis, focus=focus)
        mine.append((name, dice(seg.mask, volume.labels == labels[name])))
    gathered = ranks.gather((complete, mine))
    if not all(done for done, _ in gathered):
        return None
    scores: dict[str, list[float]] = {}
    for name, score in (item for _, part in gathered for item in part):
        scores.setdefault(name, []).append(score)
    return {name: float(np.mean(v)) for name, v in scores.items()}


class DecoderTuner:
    """Stage 2: fine-tunes ``pipeline.backbone.model.mask_decoder`` in place (it has no dropout or batch norm,
    so the same mode serves training and the pipeline's probes), and with ``config.lora_rank`` the LoRA
    adapters on the image encoder: then the slices a step decodes are embedded afresh, with gradients,
    while CPD still plans on the embeddings the round started from (those the saliency head knows).

    Args:
        pipeline: the SPD pipeline (with the trained saliency heads installed).
        labels: label name -> value of the labels to train.
        axis: slice axis.
        config: hyper-parameters.
        ranks: this process's rank (steps are shared out, the decoder runs under DDP).
    """

    def __init__(self, pipeline: SPDPipeline, labels: Mapping[str, int], axis: int, config: TrainConfig,
                 ranks: Ranks = Ranks()):
        self.pipeline = pipeline
        self.labels = dict(labels)
        self.axis = axis
        self.config = config
        self.ranks = ranks
        self.decoder = ranks.wrap(DifferentiableDecoder(pipeline.backbone))
        self.module = pipeline.backbone.model.mask_decoder
        self.encoder = pipeline.backbone.model.image_encoder
        self.adapters = encoder_lora.adapters(self.encoder) if config.lora_rank else []
        if self.adapters and ranks.distributed:
            raise ValueError("LoRA adapters are trained in one process only")
        groups = [{"params": list(self.module.parameters()), "lr": config.decoder_lr}]
        if self.adapters:
            groups.append({"params": [p for a in self.adapters for p in (a.down, a.up)], "lr": config.lora_lr})
        self.tuned = [p for group in groups for p in group["params"]]
        self.optimiser = torch.optim.AdamW(groups, weight_decay=1e-4)
        self.start_adapters = encoder_lora.current_digest(self.encoder)
        self.rng = np.random.default_rng(config.seed + 1 + 7919 * ranks.rank)  # clicks: each rank its own
        self.order = np.random.default_rng(config.seed + 1)  # order of steps: the same on every rank

    def step(self, volume: LabelledVolume, name: str) -> tuple[float, float]:
        """One update on one structure with freshly simulated clicks; returns (Dice + BCE, PSC).

        CPD runs as at inference (trained saliency, dual validation, interpolation); box
        calibration is replaced by the boxes a perfect decoder would make it measure, so a step
        costs no decoder probing. The decoder then learns both of its jobs in SPD: segmenting a
        run of adjacent slices from their consensus boxes (Dice + BCE + PSC), and segmenting the
        whole structure from the square probes that calibration tries (Dice + BCE).
        """
        cfg, value, target = self.config, self.labels[name], volume.labels == self.labels[name]
        style = ClickStyle(int(self.rng.choice(cfg.click_every)), cfg.drift_mm, cfg.off_target)
        clicks = clicks_for(volume, value, self.axis, style, self.rng)
        in_plane = [a for a in range(3) if a != self.axis]
        pixel_mm = [volume.spacing[a] for a in in_plane]
        probes = self.pipeline.probe_config(name, self.axis)
        plan = self.pipeline.plan(volume.volume, volume.spacing, volume.volume_id, clicks, volume.window, label=name,
                                  slice_axis=self.axis, anchor_boxes=lambda anchors: ideal_anchor_boxes(
                                      target, self.axis, anchors, pixel_mm, probes, self.rng))
        shape = plan.view.slice_shape

        def truth(slices: list[int]) -> torch.Tensor:
            return torch.from_numpy(np.moveaxis(np.take(target, slices, axis=self.axis), self.axis, 0).astype(np.float32))

        count = min(cfg.slices_per_step, len(plan.embeddings))
        start = int(self.rng.integers(0, len(plan.embeddings) - count + 1))
        run = list(range(plan.first + start, plan.first + start + count))
        boxes = np.array([plan.consensus.prompts[s].box for s in run], dtype=np.float32)
        probes = self._probes(plan, target, pixel_mm, name)
        groups = [(self._embeddings(plan, run), boxes, shape)]
        if probes:
            slices = [s for s, _ in probes]
            groups.append((self._embeddings(plan, slices), np.array([box for _, box in probes], dtype=np.float32),
                           shape))
        logits = self.decoder(groups)  # one forward for both groups: one DDP synchronisation per step
        run_truth = truth(run)
        segmentation = dice_bce_per_slice(logits[0], run_truth)
        psc = pairwise_slice_consistency(torch.sigmoid(logits[0]), run_truth,
                                         max(1, round(cfg.psc_band_mm / min(pixel_mm))))
        loss = segmentation + cfg.psc_weight * psc
        if probes:
            loss = loss + dice_bce_per_slice(logits[1], truth(slices))

        self.optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.tuned, 1.0)
        self.optimiser.step()
        self.pipeline.decoder_changed()
        return segmentation.item(), psc.item()

    def _embeddings(self, plan: Plan, slices: list[int]) -> torch.Tensor:
        """The slices' embeddings: the plan's, or with adapters being trained, the encoder's with gradients."""
        if self.adapters:
            return self.pipeline.backbone.encode_with_grad(plan.view.slices(slices))
        return plan.embeddings[[s - plan.first for s in slices]]

    def adapters_digest(self) -> str:
        """Names the adapters as they are now (those the round started with when they are not trained)."""
        return encoder_lora.current_digest(self.encoder) if self.adapters else self.start_adapters

    def _state(self) -> dict:
        return {"decoder": self.module.state_dict(), "adapters": encoder_lora.state(self.encoder)}

    def _validate(self, volumes: Sequence[LabelledVolume], deadline: float) -> dict[str, float] | None:
        """:func:`validate`; once the adapters have changed, on embeddings made afresh and kept in memory only."""
        tag = self.adapters_digest()
        if tag == self.start_adapters:
            return validate(self.pipeline, volumes, self.labels, self.axis, self.config, deadline, self.ranks)
        backbone, cache, start_tag = self.pipeline.backbone, self.pipeline.cache, self.pipeline.backbone.encoder_tag
        self.pipeline.cache = EmbeddingCache(cache.budget_bytes)
        backbone.encoder_changed(tag)
        try:
            return validate(self.pipeline, volumes, self.labels, self.axis, self.config, deadline, self.ranks)
        finally:
            self.pipeline.cache = cache
            backbone.encoder_changed(start_tag)

    def _probes(self, plan: Plan, target: np.ndarray, pixel_mm: Sequence[float], name: str) -> list[tuple[int, tuple]]:
        """(slice, box) of calibration probes to learn the whole structure from (one random size per anchored
        slice), only probes that overlap the structure, at most ``probes_per_step`` of them.
        """
        probes, shape = self.pipeline.probe_config(name, self.axis), plan.view.slice_shape
        chosen: list[tuple[int, tuple]] = []
        for s, prompt in plan.consensus.prompts.items():
            if not prompt.anchored:
                continue
            sizes = probe_boxes(np.mean(prompt.positives, axis=0), np.asarray(pixel_mm), shape, probes)
            box = sizes[int(self.rng.integers(len(sizes)))]
            r0, c0, r1, c1 = (int(round(v)) for v in box)
            if np.take(target, s, axis=self.axis)[r0:r1 + 1, c0:c1 + 1].any():
                chosen.append((s, box))
        return [chosen[k] for k in self.rng.permutation(len(chosen))[:self.config.probes_per_step]]

    def fit(self, train: Sequence[LabelledVolume], val: Sequence[LabelledVolume], clock: Clock, deadline: float
            ) -> tuple[dict[str, float], int, list[EpochRecord], str]:
        """Train up to ``max_epochs`` or the deadline; loads the best epoch's weights back.

        Steps stop early enough for the epoch's validation to end by the deadline; a validation that
        the deadline interrupts ends the stage (at epoch 0: the decoder is left as it was).

        Returns:
            validation Dice of the kept epoch, the kept epoch (0: unchanged), the history and why it stopped.
        """
        cfg, ranks = self.config, self.ranks
        info = logger.info if ranks.main else logger.debug
        items = [(v, name) for v in train for name in v.present(self.labels)]
        watch = [v for v in val if v.present(self.labels)] or train
        tic = time.monotonic()
        scores = self._validate(watch, deadline)
        validation_s = time.monotonic() - tic
        if scores is None:
            logger.warning("decoder: no time left to tune it after validating the decoder as it is; kept unchanged")
            return {}, 0, [], TIME_BUDGET
        best = KeepBest(cfg.patience)
        best.update(mean_dice(scores), 0, self._state)
        best_scores = scores
        history = [EpochRecord("decoder", 0, None, scores, clock.elapsed())]
        info("decoder epoch 0 (before tuning): val Dice %s; mean %.3f [%.0f s]", _fmt(scores), mean_dice(scores),
             clock.elapsed())
        stopped = "max epochs"
        for epoch in range(1, cfg.max_epochs + 1):
            if not ranks.all_agree(clock.left(deadline) > validation_s):
                info("decoder: time budget reached before epoch %d", epoch)
                stopped = TIME_BUDGET
                break
            seg_losses, psc_losses = [], []
            for k in ranks.shard(list(self.order.permutation(len(items)))):
                if not ranks.all_agree(clock.left(deadline) > validation_s):
                    break
                seg, psc = self.step(*items[k])
                seg_losses.append(seg)
                psc_losses.append(psc)
            if not seg_losses:
                stopped = TIME_BUDGET
                break
            tic = time.monotonic()
            scores = self._validate(watch, deadline)
            validation_s = time.monotonic() - tic
            if scores is None:
                info("decoder: time budget reached while validating epoch %d; it is not kept", epoch)
                stopped = TIME_BUDGET
                break
            best.update(mean_dice(scores), epoch, self._state)
            best_scores = scores if best.epoch == epoch else best_scores
            seg_loss, psc_loss = np.mean(ranks.gather((np.mean(seg_losses), np.mean(psc_losses))), axis=0)
            loss = float(seg_loss + cfg.psc_weight * psc_loss)
            steps = len(seg_losses) * ranks.world
            history.append(EpochRecord("decoder", epoch, loss, scores, clock.elapsed(),
                                       {"dice_bce": float(seg_loss), "psc": float(psc_loss), "steps": steps}))
            info("decoder epoch %d/%d: loss %.4f (Dice+BCE %.4f, PSC %.4f, %d steps x %d ranks); val Dice %s; "
                 "mean %.3f (best %.3f at epoch %d) [%.0f s]", epoch, cfg.max_epochs, loss, seg_loss, psc_loss,
                 len(seg_losses), ranks.world, _fmt(scores), mean_dice(scores), best.score, best.epoch, clock.elapsed())
            if best.stop(epoch):
                info("decoder: no better validation Dice for %d epochs; stopping", cfg.patience)
                stopped = "patience"
                break
        self.module.load_state_dict(best.state["decoder"])
        if self.adapters:
            encoder_lora.load(self.encoder, best.state["adapters"])
        self.pipeline.decoder_changed()
        return best_scores, best.epoch, history, stopped


# --------------------------------------------------------------------------- one round
def run_training(pipeline: SPDPipeline, train: Sequence[LabelledVolume], val: Sequence[LabelledVolume],
                 labels: Mapping[str, int], axis: int, config: TrainConfig, reserve_s: float = 20.0,
                 ranks: Ranks = Ranks()) -> TrainingResult:
    """Validate the served model, embed, train the saliency head, then tune the decoder, within ``config.max_seconds``.

    With ``config.lora_rank``, stage 2 also trains LoRA adapters on the image encoder (continuing the
    served ones when they have that rank); if the kept adapters changed the encoder, the slabs are
    embedded again with it and the saliency head is refitted on them, so the published head reads
    the embeddings the published encoder makes. On return the pipeline serves the new heads and
    size priors, the kept decoder weights and the kept adapters.

    Args:
        pipeline: pipeline whose backbone decoder is tuned in place and whose cache provides embeddings.
        train: training volumes (those holding none of ``labels`` are left out).
        val: validation volumes (likewise; when none is left, training volumes are watched).
        labels: label name -> value to train (each present in at least one training volume).
        axis: slice axis of training.
        config: limits and hyper-parameters.
        reserve_s: seconds kept free at the end for publishing.
        ranks: this process's rank under DDP (all ranks call this with the same arguments).
    """
    clock = Clock(config.max_seconds)
    margin = max(config.click_every)
    train = [v for v in train if v.present(labels)]
    val = [v for v in val if v.present(labels)]
    assert train, "none of the training volumes holds a label to train"
    tic = time.monotonic()
    served_dice = validate(pipeline, val or train, labels, axis, config, ranks=ranks)  # before anything changes
    logger.info("served model: val Dice %s; mean %.3f (%.0f s) — the round must do at least as well to be published",
                _fmt(served_dice), mean_dice(served_dice), time.monotonic() - tic)
    if config.lora_rank:
        _prepare_adapters(pipeline.backbone, config)
    volumes = [*train, *val]
    embedding_started = time.monotonic()
    if ranks.distributed:  # each rank embeds its share into the shared cache, then reads the others' from disk
        for volume in volumes[ranks.rank::ranks.world]:
            embed_slab(pipeline, volume, [labels[name] for name in volume.present(labels)], axis, margin)
        ranks.barrier()
    slabs: dict[str, Slab] = {}
    kept, skipped = [], []
    for n, volume in enumerate(volumes, start=1):
        is_train = n <= len(train)
        if is_train and kept and not ranks.all_agree(clock.left() >= 0.4 * config.max_seconds):
            logger.warning("time budget: %s not used; training on the %d volumes embedded so far", volume.name,
                           len(kept))
            skipped.append(volume.name)
            continue
        values = [labels[name] for name in volume.present(labels)]
        tic = time.monotonic()
        slabs[volume.name] = embed_slab(pipeline, volume, values, axis, margin)
        kept += [volume] if is_train else []
        logger.info("embedded %s (%s %d/%d): %d slices along axis %d in %.0f s [%.0f s]", volume.name,
                    "train" if is_train else "val", n, len(train) + len(val), len(slabs[volume.name].indices), axis,
                    time.monotonic() - tic, clock.elapsed())
    train = kept
    embedding_s = time.monotonic() - embedding_started
    clock.end = min(clock.end, time.monotonic() + config.train_seconds)
    val = [v for v in val if v.name in slabs]
    tic = time.monotonic()
    head, history, head_stopped = train_saliency_head(
        [slabs[v.name] for v in train], [slabs[v.name] for v in val], labels, axis, config, clock,
        deadline=time.monotonic() + 0.3 * max(clock.left() - reserve_s, 0), ranks=ranks)
    stopped = {"saliency": head_stopped}
    head_s = time.monotonic() - tic
    priors = size_priors(train, labels, axis)
    _serve_learned(pipeline, head, priors)
    logger.info("size priors (half-sizes in mm at quantiles 25/50/75/95 %%, in-plane aspect): %s",
                {name: (p.half_mm, p.aspect) for name, p in priors.items()})
    decoder_state, decoder_epoch, val_dice = None, 0, {}
    encoder = pipeline.backbone.model.image_encoder
    if pipeline.backbone.box_trained:
        tuner = DecoderTuner(pipeline, labels, axis, config, ranks)
        refit_s = 1.2 * embedding_s + head_s if tuner.adapters else 0.0
        val_dice, decoder_epoch, decoder_history, stopped["decoder"] = tuner.fit(
            train, val, clock, deadline=clock.end - reserve_s - refit_s)
        history += decoder_history
        decoder_state = {k: v.detach().cpu().clone() for k, v in tuner.module.state_dict().items()}
        if tuner.adapters_digest() != tuner.start_adapters:
            head, val_dice, refit_history = _refit_head(pipeline, head, train, val, labels, axis, config, clock,
                                                        reserve_s, val_dice)
            history += refit_history
    else:
        logger.warning("decoder tuning skipped: %s is point-trained; only the saliency head is trained",
                       pipeline.backbone.name)
        val_dice = validate(pipeline, val or train, labels, axis, config, ranks=ranks)
    result = TrainingResult(head, decoder_state, history, val_dice, decoder_epoch, [v.name for v in train],
                            [v.name for v in val], encoder_lora.state(encoder), priors, served_dice, stopped, skipped)
    if result.work()["cut_short"]:
        logger.warning("the time budget cut this round short (%s); raise max_minutes / train_minutes, or train "
                       "when the machine is less loaded, for a full round", result.work())
    return result


def _serve_learned(pipeline: SPDPipeline, head: SaliencyHead, priors: Mapping[str, SizePrior]) -> None:
    """Serve the round's head (for every label it has) and size priors on top of the state in service, with the
    encoder adapters as the round has them now (LoRA training changes them on the encoder)."""
    state = pipeline.state
    pipeline.serve(state.replace(saliency_heads={**state.saliency_heads, **{n: head.for_label(n) for n in head.labels}},
                                 size_priors={**state.size_priors, **priors},
                                 adapters=encoder_lora.state(pipeline.backbone.model.image_encoder)))


def size_priors(volumes: Sequence[LabelledVolume], labels: Mapping[str, int], axis: int) -> dict[str, SizePrior]:
    """Per label, the sizes its slices along ``axis`` have in ``volumes``' labels (labels found in none: left out)."""
    priors = {name: learn_size_prior([(v.labels == value, v.spacing) for v in volumes if name in v.present(labels)],
                                     axis) for name, value in labels.items()}
    return {name: prior for name, prior in priors.items() if prior is not None}


def _prepare_adapters(backbone: Backbone, config: TrainConfig) -> None:
    """Adapters of ``config.lora_rank`` on the image encoder: the served ones if they have that rank, else new
    ones (which start as the identity: the encoder is then the base one again)."""
    encoder = backbone.model.image_encoder
    served = encoder_lora.adapters(encoder)
    if served and served[0].rank == config.lora_rank:
        logger.info("LoRA: continuing the served rank-%d adapters (%s)", config.lora_rank, backbone.encoder_tag)
        return
    if served:
        logger.info("LoRA: the served adapters have rank %d; starting new ones of rank %d", served[0].rank,
                    config.lora_rank)
    encoder_lora.attach(encoder, config.lora_rank, config.lora_alpha)
    backbone.encoder_changed("")


def _refit_head(pipeline: SPDPipeline, head: SaliencyHead, train: Sequence[LabelledVolume],
                val: Sequence[LabelledVolume], labels: Mapping[str, int], axis: int, config: TrainConfig, clock: Clock,
                reserve_s: float, val_dice: dict[str, float]) -> tuple[SaliencyHead, dict[str, float], list[EpochRecord]]:
    """After the adapters changed the encoder: embed the slabs with it (into the cache, under the adapters'
    digest, where serving will find them), refit the head on them and validate the whole pipeline again."""
    backbone = pipeline.backbone
    backbone.encoder_changed(encoder_lora.current_digest(backbone.model.image_encoder))
    logger.info("LoRA: the encoder changed (%s); embedding the training slices again to refit the saliency head",
                backbone.encoder_tag)
    margin = max(config.click_every)
    slabs = {v.name: embed_slab(pipeline, v, [labels[n] for n in v.present(labels)], axis, margin) for v in [*train, *val]}
    head, history, _ = train_saliency_head([slabs[v.name] for v in train], [slabs[v.name] for v in val], labels,
                                           axis, config, clock, deadline=clock.end - reserve_s, start=head,
                                           stage="saliency refit")
    _serve_learned(pipeline, head, {})
    scores = validate(pipeline, val or train, labels, axis, config, deadline=clock.end - reserve_s / 2)
    if scores is None:
        logger.warning("LoRA: no time left to validate the refitted head; reporting the decoder stage's Dice")
        return head, val_dice, history
    logger.info("LoRA: validation Dice with the refitted head %s; mean %.3f", _fmt(scores), mean_dice(scores))
    return head, scores, history
