"""TaskConfig for ``spd_sam``: reads ``--conf``, loads the backbone, builds the infer task, trainer and scoring."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.config import TaskConfig
from monailabel.utils.others.generic import strtobool

from lib.activelearning.uncertainty import SPDUncertainty, SPDUncertaintyScoring
from lib.infers.spd_auto_infer import SPDAutoInfer
from lib.infers.spd_infer import SPDInfer
from lib.spd.method import Interactions, SPDPipeline
from lib.spd.method.focus import FocusConfig
from lib.spd.runtime import EncoderSettings, load_backbone
from lib.spd.serving import BackgroundEmbedder, CheckpointStore, EmbeddingCache, ModelReloader
from lib.trainers.spd_trainer import SPDTrainer

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[2]
DEFAULTS = {
    "backbone": "lite_medsam",  # lite_medsam | vit_b | vit_l | vit_h | medsam
    "checkpoint": "",  # required for the ViT backbones and MedSAM
    "device": "",  # "" = every visible GPU (the first also decodes), else CPU; or e.g. cuda:1, cpu
    "runtime": "auto",  # auto | torch | onnxruntime (image encoder on the CPU)
    "precision": "auto",  # auto (bf16 autocast on CUDA, float32 on the CPU) | float32 | bfloat16
    "gpu_memory_mb": "0",  # GPU memory per device for embedding chunks; 0 = 80 % of what is free
    "compile": "false",  # torch.compile the image encoder on CUDA (the first request compiles)
    "focus": "true",  # decode small structures on a region around them (false: whole slices, no extra embedding)
    "modality": "auto",  # auto | CT | MR (intensity window)
    "draft": "auto",  # true: a first request on a cold volume gets a draft from the clicked slices alone; the same
    # request again gets the full result once the rest is embedded. auto: where the image encoder runs on the CPU
    "labels": str(APP_DIR / "labels.json"),
    "embedding_cache_mb": "2048",
    "embedding_cache_dir": "",  # "" = <datastore cache>/spd_embeddings
    "embedding_cache_disk_mb": "20480",  # 20 GiB of slice files, room left for the datastore; 0 = unbounded
    "trained_dir": "",  # "" = <app>/model/spd_sam: versioned trained checkpoints and the `current` pointer
}


def _cache_root() -> Path:
    root = settings.MONAI_LABEL_DATASTORE_CACHE_PATH or os.path.join(Path.home(), ".cache", "monailabel")
    return Path(root)


def build_pipeline(options: dict[str, str], model_dir: str, device: str | None = None) -> SPDPipeline:
    """The SPD pipeline the options describe, on ``device`` (default: the ``device`` option).

    Module-level so that ``functools.partial(build_pipeline, options, model_dir)`` can be sent to
    the processes of a distributed training round.
    """
    backbone = load_backbone(
        options["backbone"],
        checkpoint=options["checkpoint"] or None,
        device=device or options["device"] or None,
        runtime=options["runtime"],
        cache_dir=os.path.join(model_dir, "runtime"),
        encoder_settings=EncoderSettings(precision=options["precision"],
                                         memory_budget_bytes=int(options["gpu_memory_mb"]) << 20,
                                         compile=strtobool(options["compile"])),
    )
    cache_dir = options["embedding_cache_dir"] or _cache_root() / "spd_embeddings"
    return SPDPipeline(backbone, EmbeddingCache(int(options["embedding_cache_mb"]) << 20, cache_dir,
                                                int(options["embedding_cache_disk_mb"]) << 20),
                       focus=FocusConfig() if strtobool(options["focus"]) else None)


class SPDSamConfig(TaskConfig):
    """One model, ``spd_sam``; options come from ``--conf key value`` (see ``DEFAULTS``)."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        options = {k: conf.get(k, v) for k, v in DEFAULTS.items()}
        with open(options["labels"]) as handle:
            self.labels = {str(k): int(v) for k, v in json.load(handle).items()}
        self.factory = functools.partial(build_pipeline, options, model_dir)
        self.pipeline = self.factory()
        backbone, cache_dir = self.pipeline.backbone, self.pipeline.cache.directory
        self.modality = options["modality"]
        self.draft = backbone.device.type == "cpu" if options["draft"] == "auto" else strtobool(options["draft"])
        self.background = BackgroundEmbedder()
        self.interactions = Interactions(self.pipeline)  # spd_sam's sessions; spd_sam_auto's results start them
        self.store = CheckpointStore(options["trained_dir"] or os.path.join(model_dir, name))
        self.served = ModelReloader(self.store, self.pipeline)
        self.served.refresh()
        logger.info("spd_sam: backbone %s (%s on %s); embeddings cached in %s (%s MB in memory, %s MB disk budget, "
                    "%d MB on disk)", backbone.name, backbone.runtime, backbone.device, cache_dir,
                    options["embedding_cache_mb"], options["embedding_cache_disk_mb"],
                    self.pipeline.cache.usage()["disk_bytes"] >> 20)

    def infer(self) -> SPDInfer:
        return SPDInfer(self.pipeline, self.labels, self.background, self.modality, self.served, self.interactions,
                        self.draft)

    def auto_infer(self) -> SPDAutoInfer:
        """``spd_sam_auto``: the structures the published model has learned, without clicks."""
        return SPDAutoInfer(self.pipeline, self.labels, self.background, self.modality, self.served, self.interactions)

    def trainer(self) -> SPDTrainer:
        return SPDTrainer(self.pipeline, self.labels, self.store, self.modality, self.factory)

    def strategy(self) -> SPDUncertainty:
        return SPDUncertainty()

    def scoring_method(self) -> SPDUncertaintyScoring:
        return SPDUncertaintyScoring(self.pipeline, self.served, self.modality)
