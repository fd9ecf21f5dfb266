"""The ``spd_sam`` trainer: the datastore's final labels in, a new published SPD checkpoint out.

MONAI Label runs it in a subprocess (``POST /train/spd_sam``) that builds the app again, so the
pipeline here already serves the published checkpoint and training continues from it. Progress
goes to the log, whose last lines ``GET /train/`` shows. Nothing is published unless the round
completes and validates at least as well as the served model; a stopped, crashed or worse round
leaves the served model as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk
import torch
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.spd.method import SPDPipeline, choose_window
from lib.spd.method.prompts import slice_axes
from lib.spd.runtime import encoder_lora
from lib.spd.serving import CheckpointStore
from lib.spd.training import LabelledVolume, TrainConfig, round_axis, run_training, split_by_volume
from lib.trainers.distributed_round import Job, LaunchError, plan_launch, run_distributed
from lib.trainers.process_priority import yield_to_requests
from lib.trainers.publishing import publish_round
from lib.volume_io import VolumeReader

logger = logging.getLogger(__name__)

# Request parameters (also shown as the trainer's config in /info/): sized so that a round on
# four labelled volumes finishes within 15 minutes on a 2-core CPU, embedding included.
DEFAULTS: dict[str, Any] = {
    "max_epochs": TrainConfig.max_epochs,  # decoder epochs
    "head_epochs": TrainConfig.head_epochs,  # saliency head epochs
    "max_minutes": 12.0,  # the whole round, embedding included
    "train_minutes": TrainConfig.train_seconds / 60,  # the training stages, once the slices are embedded
    "val_fraction": 0.25,
    "patience": 4,
    "labels": "",  # comma-separated names; "" = every label found in the final labels
    "slice_axis": "",  # "" = the coarsest axis of most volumes, the one the infer side embeds in the background
    "publish": "if_better",  # or "always": publish even when validation is worse than the served model's
    "psc_weight": TrainConfig.psc_weight,
    "decoder_lr": TrainConfig.decoder_lr,
    "head_lr": TrainConfig.head_lr,
    "seed": 0,
    "lora_rank": 0,  # LoRA adapters on the image encoder, trained with the decoder (MedSAM only; 0 = off)
    "lora_alpha": TrainConfig.lora_alpha,
    "lora_lr": TrainConfig.lora_lr,
    "multi_gpu": True,  # MONAI Label's switch: DDP over the GPUs in `gpus` when there are two or more
    "gpus": "all",
    "cpu_processes": 1,  # without CUDA: DDP over this many CPU processes (gloo)
}


class TrainRequestError(ValueError):
    """A training parameter is malformed; the message names it."""


def _number(request: dict, key: str, kind: type, low: float, high: float):
    value = request.get(key, DEFAULTS[key])
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise TrainRequestError(f"{key} must be a number, got {value!r}") from None
    if not low <= number <= high:
        raise TrainRequestError(f"{key} must be within [{low}, {high}], got {value!r}")
    return number


def parse_request(request: dict, label_map: dict[str, int]) -> tuple[TrainConfig, float, list[str], int | None]:
    """Training config, validation fraction, requested labels and slice axis from a train request.

    Raises:
        TrainRequestError: a value of the wrong type, out of range, or an unknown label.
    """
    names = request.get("labels", DEFAULTS["labels"]) or []
    names = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in label_map]
    if unknown:
        raise TrainRequestError(f"unknown labels {unknown}; known labels: {', '.join(label_map)}")
    axis = request.get("slice_axis", DEFAULTS["slice_axis"])
    axis = None if axis in ("", None) else _number(request, "slice_axis", int, 0, 2)
    config = TrainConfig(
        max_epochs=_number(request, "max_epochs", int, 1, 1000),
        head_epochs=_number(request, "head_epochs", int, 1, 10000),
        max_seconds=60.0 * _number(request, "max_minutes", float, 0.1, 24 * 60),
        train_seconds=60.0 * _number(request, "train_minutes", float, 0.1, 24 * 60),
        patience=_number(request, "patience", int, 1, 1000),
        psc_weight=_number(request, "psc_weight", float, 0.0, 100.0),
        decoder_lr=_number(request, "decoder_lr", float, 0.0, 1.0),
        head_lr=_number(request, "head_lr", float, 0.0, 1.0),
        seed=_number(request, "seed", int, 0, 2**31 - 1),
        lora_rank=_number(request, "lora_rank", int, 0, 256),
        lora_alpha=_number(request, "lora_alpha", float, 0.0, 1e4),
        lora_lr=_number(request, "lora_lr", float, 0.0, 1.0),
    )
    return config, _number(request, "val_fraction", float, 0.0, 0.9), names, axis


def publish_always(request: dict) -> bool:
    """Whether the request asks to publish even a round that validates worse than the served model."""
    value = str(request.get("publish", DEFAULTS["publish"])).strip().lower()
    if value not in ("if_better", "always"):
        raise TrainRequestError(f"publish must be 'if_better' or 'always', got {value!r}")
    return value == "always"


def final_label_file(datastore: Datastore, image_id: str) -> str | None:
    """The final label of an image as a local file with the app's label values, or None.

    A DICOMweb datastore is a local datastore over its cache that keeps a copy of every label saved
    through this server; its own ``get_label_uri`` would instead fetch the DICOM-SEG whose series id
    is the label id (for those copies: the image id, which fails), and a SEG read back carries
    segment numbers 1..n rather than the app's label values. So the local copy is used.
    """
    label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
    if not label_id:
        return None
    if isinstance(datastore, LocalDatastore):
        path = LocalDatastore.get_label_uri(datastore, label_id, DefaultLabelTag.FINAL)
    else:
        path = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL)
    return path if path and os.path.isfile(path) else None


class SPDTrainer(TrainTask):
    """Stage 1 (saliency head) and stage 2 (mask decoder with PSC) on the final labels.

    Args:
        pipeline: the pipeline of this process (its decoder is tuned in place).
        labels: label name -> value in label volumes.
        store: where checkpoints are published.
        modality: intensity window choice, as for inference.
        pipeline_factory: device -> a new pipeline like ``pipeline`` (picklable; each DDP rank builds one).
            None: distributed training is not available.
    """

    def __init__(self, pipeline: SPDPipeline, labels: dict[str, int], store: CheckpointStore, modality: str = "auto",
                 pipeline_factory: Callable[[str], SPDPipeline] | None = None):
        super().__init__("SPD-SAM: saliency head and mask decoder (pairwise slice consistency) from final labels")
        self.pipeline = pipeline
        self.labels = dict(labels)
        self.store = store
        self.modality = modality
        self.pipeline_factory = pipeline_factory

    def config(self) -> dict:
        return dict(DEFAULTS)

    def stats(self) -> dict:
        meta = self.store.metadata()
        keys = ("version", "published", "labels", "val_dice", "served_val_dice", "decoder_epoch", "work",
                "train_volumes", "val_volumes", "seconds", "world_size")
        return {k: meta[k] for k in keys if k in meta}

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        started = time.monotonic()
        yield_to_requests()
        config, val_fraction, wanted, axis = parse_request(request, self.labels)
        always = publish_always(request)
        try:
            launch = plan_launch(request, self.pipeline.backbone.device, torch.cuda.device_count())
        except LaunchError as error:
            raise TrainRequestError(str(error)) from None
        if launch and self.pipeline_factory is None:
            raise TrainRequestError("distributed training needs a pipeline factory; this trainer has none")
        backbone = self.pipeline.backbone
        if config.lora_rank and not (backbone.box_trained and encoder_lora.adapters_fit(backbone.model.image_encoder)):
            raise TrainRequestError(f"lora_rank: LoRA adapters need a box-trained SAM ViT backbone (medsam); "
                                    f"this server runs {backbone.name}")
        if config.lora_rank and launch:
            raise TrainRequestError("lora_rank: LoRA adapters are trained in one process; set multi_gpu to false")
        volumes = self._load(datastore)
        if not volumes:
            raise RuntimeError("no image has a final label in the datastore: save labels with tag 'final' first")
        requested = {n: self.labels[n] for n in (wanted or self.labels)}
        unused = [v.name for v in volumes if not v.present(requested)]
        if unused:
            logger.info("not used: %s (none of the labels %s in their final label)", unused, list(requested))
        volumes = [v for v in volumes if v.present(requested)]
        if not volumes:
            raise RuntimeError(f"no final label holds any of the labels {list(requested)}")
        axis = round_axis(volumes) if axis is None else axis
        flat = [v.name for v in volumes if axis not in slice_axes(v.labels.shape)]
        if flat:
            logger.info("not used: %s (a voxel thin along axis %d)", flat, axis)
            volumes = [v for v in volumes if v.name not in flat]
        if not volumes:
            raise RuntimeError(f"no labelled volume has 2D slices along axis {axis}")
        train_names, val_names = split_by_volume([v.name for v in volumes], val_fraction, config.seed)
        by_name = {v.name: v for v in volumes}
        train, val = [by_name[n] for n in train_names], [by_name[n] for n in val_names]
        present = {n for v in train for n in v.present(self.labels)}
        labels = {n: v for n, v in self.labels.items() if n in present and (not wanted or n in wanted)}
        if not labels:
            raise RuntimeError(f"none of the labels {wanted or list(self.labels)} occurs in the training volumes")
        config = dataclasses.replace(config, max_seconds=config.max_seconds - (time.monotonic() - started))
        logger.info("spd_sam training: %d train volumes %s, %d validation %s; labels %s; axis %d; at most %d head "
                    "and %d decoder epochs, %.1f min", len(train), train_names, len(val), val_names, list(labels), axis,
                    config.head_epochs, config.max_epochs, config.max_seconds / 60)

        if launch:
            return run_distributed(Job(launch, self.pipeline_factory, str(self.store.directory), train, val, labels, axis,
                                       config, time.monotonic() - started, logging.getLogger().getEffectiveLevel(),
                                       always))
        served = self.pipeline.state
        with self._training_copy():
            result = run_training(self.pipeline, train, val, labels, axis, config)
        return publish_round(self.store, self.pipeline, served, result, axis, config,
                             time.monotonic() - started, always=always)

    @contextmanager
    def _training_copy(self) -> Iterator[None]:
        """Train on the served state with a copy of its decoder, and serve the served state again afterwards.

        MONAI Label trains in a subprocess of its own, but ``run_sync=true`` trains in the server:
        there the served model must stay as it is until the new version is published (or forever,
        when the round fails).
        """
        served = self.pipeline.state
        self.pipeline.serve(served.replace(decoder=copy.deepcopy(self.pipeline.backbone.model.mask_decoder)))
        try:
            yield
        finally:
            self.pipeline.serve(served)

    def _load(self, datastore: Datastore) -> list[LabelledVolume]:
        """Images with a final label, read as the infer side reads them (same ids, same windows)."""
        reader = VolumeReader(keep=1)
        volumes = []
        for name in sorted(set(datastore.get_labeled_images(DefaultLabelTag.FINAL))):  # DICOMweb: one per SEG
            label_file = final_label_file(datastore, name)
            if label_file is None:
                logger.warning("skipping %s: its final label is not in this server's datastore (a DICOM-SEG saved "
                               "to the PACS by another tool?)", name)
                continue
            image = reader.read(datastore.get_image_uri(name))
            labels = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
            labels = labels.transpose(2, 1, 0)
            if labels.shape != image.array.shape:
                logger.warning("skipping %s: label shape %s differs from image shape %s", name, labels.shape,
                               image.array.shape)
                continue
            volumes.append(LabelledVolume(name, np.ascontiguousarray(image.array), np.rint(labels).astype(np.int32),
                                          image.spacing, image.volume_id, choose_window(image.array, self.modality)))
        return volumes
