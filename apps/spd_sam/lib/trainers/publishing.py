"""Publishing a finished training round: checkpoint payload, metadata and training curve."""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from typing import Mapping

from lib.spd import encoder_lora
from lib.spd.checkpoints import CheckpointStore
from lib.spd.pipeline import SPDPipeline
from lib.spd.saliency_head import SaliencyHead
from lib.spd.training import TrainConfig, TrainingResult
from lib.trainers.training_curve import render_training_curve

logger = logging.getLogger(__name__)


def heads_to_save(previous: Mapping, new: SaliencyHead) -> list[dict]:
    """The new head, after the published heads that still serve labels this round did not train."""
    kept = {id(s.head): s.head for name, s in previous.items() if name not in new.labels}
    return [{"config": h.config(), "state": h.state_dict()} for h in [*kept.values(), new]]


def publish_round(store: CheckpointStore, pipeline: SPDPipeline, previous_heads: Mapping, result: TrainingResult,
                  axis: int, config: TrainConfig, seconds: float, world_size: int = 1) -> dict:
    """Publish ``result`` as the next version; returns the trainer's answer (version, time, Dice, labels).

    Args:
        store: checkpoint folder.
        pipeline: the pipeline that was trained (its backbone names the weights the checkpoint fits).
        previous_heads: the saliency heads served before the round (label -> head view).
        result: what the round produced.
        axis: slice axis of training.
        config: the round's settings (stored with the checkpoint).
        seconds: wall time of the round so far.
        world_size: processes that trained (DDP ranks).
    """
    backbone = pipeline.backbone
    labels = list(result.head.labels)
    metadata = {
        "backbone": backbone.name, "weights_id": backbone.weights_id, "labels": labels,
        "encoder_adapters": encoder_lora.digest(result.adapters) or None,
        "val_dice": {k: round(v, 4) for k, v in result.val_dice.items()}, "decoder_epoch": result.decoder_epoch,
        "train_volumes": result.train_volumes, "val_volumes": result.val_volumes, "slice_axis": axis,
        "world_size": world_size, "seconds": round(seconds, 1),
        "published": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": dataclasses.asdict(config), "history": [r.to_json() for r in result.history],
    }
    payload = {"saliency_heads": heads_to_save(previous_heads, result.head), "decoder_state": result.decoder_state,
               "encoder_adapters": result.adapters}
    title = f"spd_sam: {len(result.train_volumes)} train / {len(result.val_volumes)} validation volumes"
    version = store.publish(payload, metadata, {".png": render_training_curve(result.history, title)})
    logger.info("spd_sam training done in %.0f s: published v%04d (validation Dice %s, decoder epoch %d)",
                seconds, version, metadata["val_dice"], result.decoder_epoch)
    return {"version": version, "seconds": metadata["seconds"], "val_dice": metadata["val_dice"],
            "decoder_epoch": result.decoder_epoch, "labels": labels, "world_size": world_size}
