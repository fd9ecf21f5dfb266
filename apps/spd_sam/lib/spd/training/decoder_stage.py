"""Stage 2: the mask decoder (and LoRA adapters) tuned on the prompts SPD itself makes."""

from __future__ import annotations

import logging
import time
from typing import Mapping, Sequence

import numpy as np
import torch

from ..method.box_probing import probe_boxes
from ..method.consistency import pairwise_slice_consistency
from ..method.pipeline import Plan, SPDPipeline
from ..runtime import encoder_lora
from ..runtime.differentiable_decoder import DifferentiableDecoder
from ..serving.embedding_cache import EmbeddingCache
from .click_simulation import ClickStyle
from .config import TrainConfig
from .data import LabelledVolume, clicks_for, ideal_anchor_boxes
from .distributed import Rank
from .losses import dice_bce_per_slice
from .progress import TIME_BUDGET, Clock, EpochRecord, KeepBest
from .scores import format_scores, mean_dice
from .validation import validate

logger = logging.getLogger(__name__)


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
                 ranks: Rank = Rank()):
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
        box probing is replaced by the boxes a perfect decoder would make it measure, so a step
        costs no decoder probing. The decoder then learns both of its jobs in SPD: segmenting a
        run of adjacent slices from their consensus boxes (Dice + BCE + PSC), and segmenting the
        whole structure from the square probes that box probing tries (Dice + BCE).
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
        """(slice, box) of box probes to learn the whole structure from (one random size per anchored
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
        info("decoder epoch 0 (before tuning): val Dice %s; mean %.3f [%.0f s]", format_scores(scores), mean_dice(scores),
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
                 len(seg_losses), ranks.world, format_scores(scores), mean_dice(scores), best.score, best.epoch, clock.elapsed())
            if best.stop(epoch):
                info("decoder: no better validation Dice for %d epochs; stopping", cfg.patience)
                stopped = "patience"
                break
        self.module.load_state_dict(best.state["decoder"])
        if self.adapters:
            encoder_lora.load(self.encoder, best.state["adapters"])
        self.pipeline.decoder_changed()
        return best_scores, best.epoch, history, stopped
