"""One training round: validate the served model, embed the labelled slabs, stage 1, stage 2, refit after LoRA."""

from __future__ import annotations

import logging
import time
from typing import Mapping, Sequence

from ..method.pipeline import SPDPipeline
from ..method.saliency_head import SaliencyHead
from ..method.size_prior import SizePrior, learn_size_prior
from ..runtime import encoder_lora
from ..runtime.backbones import Backbone
from .config import TrainConfig
from .data import LabelledVolume, Slab, embed_slab
from .decoder_stage import DecoderTuner
from .distributed import Rank
from .progress import Clock, EpochRecord, TrainingResult
from .saliency_stage import train_saliency_head
from .scores import format_scores, mean_dice
from .validation import validate

logger = logging.getLogger(__name__)


def run_training(pipeline: SPDPipeline, train: Sequence[LabelledVolume], val: Sequence[LabelledVolume],
                 labels: Mapping[str, int], axis: int, config: TrainConfig, reserve_s: float = 20.0,
                 ranks: Rank = Rank()) -> TrainingResult:
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
                format_scores(served_dice), mean_dice(served_dice), time.monotonic() - tic)
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
    logger.info("LoRA: validation Dice with the refitted head %s; mean %.3f", format_scores(scores), mean_dice(scores))
    return head, scores, history
