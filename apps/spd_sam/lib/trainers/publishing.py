"""Publishing a finished training round: checkpoint payload, metadata and training curve.

A round whose validation Dice is below the served model's on the same volumes and clicks is not
published (unless the request says ``publish: always``): the served model stays, and the answer
and the log say why.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from typing import Mapping

from lib.spd.method import SaliencyHead, SizePrior, SPDPipeline, TrainedState
from lib.spd.runtime import encoder_lora
from lib.spd.serving import CheckpointStore
from lib.spd.training import TrainConfig, TrainingResult, mean_dice
from lib.trainers.training_curve import render_training_curve

logger = logging.getLogger(__name__)


def heads_to_save(previous: Mapping, new: SaliencyHead) -> list[dict]:
    """The new head, after the published heads that still serve labels this round did not train."""
    kept = {id(s.head): s.head for name, s in previous.items() if name not in new.labels}
    return [{"config": h.config(), "state": h.state_dict()} for h in [*kept.values(), new]]


def priors_to_save(previous: Mapping[str, SizePrior], new: Mapping[str, SizePrior]) -> dict[str, dict]:
    """The size priors of this round, and the published ones of labels it did not train."""
    return {name: prior.to_json() for name, prior in {**previous, **new}.items()}


def publish_round(store: CheckpointStore, pipeline: SPDPipeline, served: TrainedState, result: TrainingResult,
                  axis: int, config: TrainConfig, seconds: float, world_size: int = 1, always: bool = False) -> dict:
    """Publish ``result`` as the next version if it validates at least as well as the served model (or
    ``always``); returns the trainer's answer (published, version, time, Dice, work done, labels).

    Args:
        store: checkpoint folder.
        pipeline: the pipeline that was trained (its backbone names the weights the checkpoint fits).
        served: the state served before the round (its heads and size priors of other labels are kept).
        result: what the round produced.
        axis: slice axis of training.
        config: the round's settings (stored with the checkpoint).
        seconds: wall time of the round so far.
        world_size: processes that trained (DDP ranks).
        always: publish even when the round validates worse than the served model.
    """
    backbone = pipeline.backbone
    labels = list(result.head.labels)
    served_dice = {k: round(v, 4) for k, v in result.served_dice.items()}
    answer = {"seconds": round(seconds, 1), "val_dice": {k: round(v, 4) for k, v in result.val_dice.items()},
              "served_val_dice": served_dice, "decoder_epoch": result.decoder_epoch, "work": result.work(),
              "labels": labels, "world_size": world_size}
    if not (always or result.better_than_served()):
        reason = (f"validation Dice {mean_dice(answer['val_dice']):.4f} is below the served model's "
                  f"{mean_dice(served_dice):.4f} on the same volumes and clicks")
        logger.warning("spd_sam training done in %.0f s: not published, %s; the served model (v%s) stays",
                       seconds, reason, store.current())
        return {"published": False, "reason": reason, "version": store.current(), **answer}
    metadata = {
        "backbone": backbone.name, "weights_id": backbone.weights_id, "labels": labels,
        "encoder_adapters": encoder_lora.digest(result.adapters) or None,
        "val_dice": answer["val_dice"], "served_val_dice": served_dice, "decoder_epoch": result.decoder_epoch,
        "work": answer["work"], "train_volumes": result.train_volumes, "val_volumes": result.val_volumes,
        "slice_axis": axis,
        "world_size": world_size, "seconds": round(seconds, 1),
        "published": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": dataclasses.asdict(config), "history": [r.to_json() for r in result.history],
        "size_priors": priors_to_save(served.size_priors, result.size_priors),
    }
    payload = {"saliency_heads": heads_to_save(served.saliency_heads, result.head), "decoder_state": result.decoder_state,
               "encoder_adapters": result.adapters, "size_priors": metadata["size_priors"]}
    title = f"spd_sam: {len(result.train_volumes)} train / {len(result.val_volumes)} validation volumes"
    version = store.publish(payload, metadata, {".png": render_training_curve(result.history, title)})
    logger.info("spd_sam training done in %.0f s: published v%04d (validation Dice %s, served model's %s, decoder "
                "epoch %d, work %s)", seconds, version, metadata["val_dice"], served_dice, result.decoder_epoch,
                answer["work"])
    return {"published": True, "version": version, **answer}

