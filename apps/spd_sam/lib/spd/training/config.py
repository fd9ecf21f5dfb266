"""The limits and hyper-parameters of a training round: one source for their defaults."""

from __future__ import annotations

from dataclasses import dataclass


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
        probes_per_step: box probes decoded per decoder step.
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
