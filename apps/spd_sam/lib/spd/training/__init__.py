"""Training from the labels annotators save: stage 1 (saliency head) and stage 2 (mask decoder with PSC).

Stage 1 trains one :class:`SaliencyHead` for all labels on the embeddings of labelled slices
(every slice of a structure plus a margin of slices without it) with Dice + focal loss.

Stage 2 fine-tunes the backbone's mask decoder (image encoder frozen) on the prompts that SPD
itself produces at inference: each step simulates fresh clinical clicks on a training structure
(one every k slices, drifting, some off target) and runs the pipeline's plan (trained saliency ->
CPD -> boxes carried between anchored slices), with the anchored slices' boxes measured as a
perfect decoder would let box probing measure them. The decoder then learns its two jobs:
a run of adjacent slices from their consensus boxes (Dice + BCE per slice + lambda * PSC over
adjacent pairs), and the whole structure from box probing's square probes (Dice + BCE).
Validation segments the held-out volumes with the full pipeline (real box probing) each epoch;
the best epoch is kept (epoch 0, the decoder as it was, included). The served model (its heads and
decoder, as the round found them) is validated on the same volumes and clicks first, so the
publisher can refuse a round that is worse than what it would replace. The result records how
much work the round did (epochs, steps, why each stage stopped), since a time-bounded round on a
loaded machine does less.

Under DDP (``ranks`` of :class:`~lib.spd.training.distributed.Rank`) every rank takes its share of slice batches,
training steps, validation segmentations and slabs to embed; the head and the decoder are wrapped
in DistributedDataParallel, so all ranks hold the same weights after every step.
"""

from .click_simulation import ClickStyle, simulate_clicks
from .config import TrainConfig
from .data import LabelledVolume, round_axis, split_by_volume
from .distributed import Rank, exit_rank
from .progress import TIME_BUDGET, EpochRecord, TrainingResult
from .round import run_training
from .scores import dice, mean_dice
from .validation import validate

__all__ = ["TIME_BUDGET", "ClickStyle", "EpochRecord", "LabelledVolume", "Rank", "TrainConfig", "TrainingResult",
           "dice", "exit_rank", "mean_dice", "round_axis", "run_training", "simulate_clicks", "split_by_volume", "validate"]
