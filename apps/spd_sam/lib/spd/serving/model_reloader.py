"""Keeps a pipeline serving the published checkpoint: checked at every request, reloaded without a restart."""

from __future__ import annotations

import copy
import logging
import threading

from ..method.pipeline import SPDPipeline
from ..method.saliency_head import SaliencyHead
from ..method.size_prior import SizePrior
from ..method.trained_state import TrainedState
from ..runtime import encoder_lora
from .checkpoints import CheckpointError, CheckpointStore

logger = logging.getLogger(__name__)


class ModelReloader:
    """Serves the published checkpoint: builds its :class:`TrainedState` and switches the pipeline to it.

    A checkpoint without a decoder (or the pointer's removal) serves the backbone's own decoder. A
    checkpoint that cannot be used is refused with an error in the log, and the next older version
    is tried; the state in service stays as it was when none can be used. Versions are immutable,
    so a refused one is not tried again.

    Args:
        store: the checkpoint folder.
        pipeline: the pipeline to switch.
    """

    def __init__(self, store: CheckpointStore, pipeline: SPDPipeline):
        self.store = store
        self.pipeline = pipeline
        self._stamp: tuple | None = None
        self._refused: set[int] = set()
        self._lock = threading.Lock()

    @property
    def version(self) -> int | None:
        """The version in service (None: untrained)."""
        return self.pipeline.state.version

    def refresh(self) -> int | None:
        """Load the published version if the pointer changed since the last call; returns the served version."""
        stamp = self.store.pointer_stamp()
        if stamp == self._stamp:
            return self.version
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                self._load_published()
        return self.version

    def _load_published(self) -> None:
        backbone = self.pipeline.backbone
        candidates = self.store.candidates()
        if not candidates and self.version is not None:
            logger.warning("no published checkpoint in %s any more: serving the untrained model", self.store.directory)
            self.pipeline.serve(TrainedState())
        for version in [v for v in candidates if v not in self._refused]:
            if version == self.version:
                return
            try:
                checkpoint = self.store.load(version, backbone.name, backbone.weights_id)
                state = self._build(checkpoint)
            except CheckpointError as error:
                logger.error("refusing checkpoint v%04d: %s", version, error)
                self._refused.add(version)
                continue
            self.pipeline.serve(state)
            meta = checkpoint["metadata"]
            logger.info("serving checkpoint v%04d (labels %s; size priors %s; validation Dice %s%s)", version,
                        ", ".join(state.saliency_heads) or "none", ", ".join(state.size_priors) or "none",
                        meta.get("val_dice"), f"; encoder adapters {backbone.encoder_tag}" if state.adapters else "")
            return

    def _build(self, checkpoint: dict) -> TrainedState:
        """The state of a checkpoint: heads, size priors, decoder and checked encoder adapters, strictly loaded."""
        metadata = checkpoint["metadata"]
        path = self.store.path(metadata["version"])
        try:
            heads = {}
            trained_axis = metadata.get("slice_axis")  # checkpoints whose heads do not name their axis
            for saved in checkpoint["saliency_heads"]:  # later heads take over their labels from earlier ones
                config = saved["config"]
                head = SaliencyHead(config["labels"], config["in_channels"], config["width"],
                                    config.get("axis", trained_axis))
                head.load_state_dict(saved["state"], strict=True)
                heads.update({name: head.eval().for_label(name) for name in head.labels})
            decoder = None
            if checkpoint.get("decoder_state") is not None:
                decoder = copy.deepcopy(self.pipeline.base_decoder)
                decoder.load_state_dict(checkpoint["decoder_state"], strict=True)
                decoder.eval()
            priors = {name: SizePrior.from_json(data) for name, data in (checkpoint.get("size_priors") or {}).items()}
            adapters = checkpoint.get("encoder_adapters")
            if adapters is not None:
                encoder_lora.check(self.pipeline.backbone.model.image_encoder, adapters)
        except (KeyError, TypeError, RuntimeError, AssertionError, ValueError) as error:
            raise CheckpointError(f"{path}: weights do not fit this model: {error}") from None
        return TrainedState(heads, priors, decoder, adapters, metadata["version"])
