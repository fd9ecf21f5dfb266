"""The ``spd_sam_auto`` infer task: no clicks; every structure the served model has learned, in one label volume."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.memory_trim import release_free_memory
from lib.infers.results_ahead import ResultsAhead
from lib.infers.spd_infer import SPDInfer
from lib.spd.method import Segmentation
from lib.spd.method.prompts import PromptError, slice_axes
from lib.spd.method.self_prompts import SelfPromptConfig
from lib.volume_io import ImageReadError, write_label

logger = logging.getLogger(__name__)


@dataclass
class AutoResult:
    """The learned structures of one volume: one label volume, what was found of each, and their segmentations."""

    labels: np.ndarray
    structures: dict[str, dict]
    segmentations: dict[str, Segmentation]
    model_version: int | None


class SPDAutoInfer(SPDInfer):
    """Segmentation-type task (Slicer's *Auto Segmentation*, OHIF's segmentation mode): the trained saliency
    heads place the clicks themselves (``self_prompts``) and the SPD pipeline segments each learned structure.

    Shares the pipeline, embedding cache, published model and interaction sessions with ``spd_sam`` (same
    arguments as :class:`SPDInfer`): each structure's result becomes the client's session for it, so the clicks
    it sends next to ``spd_sam`` correct the auto segmentation. :meth:`precompute` segments a volume ahead (the
    proposed next sample); the request for it then answers from that result. Params: optional ``label`` (a name) or ``labels``
    (a list of names) to segment only those; the result format params of ``spd_sam``.
    """

    def __init__(self, *args, prompts: SelfPromptConfig = SelfPromptConfig(), **kwargs):
        super().__init__(*args, **kwargs)
        self.type = InferType.SEGMENTATION
        self.description = ("SPD-SAM auto: every structure the served model has learned, without clicks "
                            "(needs a training round first)")
        self.prompts = prompts
        self.ahead: ResultsAhead[AutoResult] = ResultsAhead(name="spd-auto-ahead")

    def info(self) -> dict[str, Any]:
        """As MONAI Label lists it in ``/info/``; ``labels`` are the structures it can segment now."""
        if self.served:
            self.served.refresh()
        info = super().info()
        info["labels"] = {name: self.label_map[name] for name in self.pipeline.trained_labels() if name in self.label_map}
        return info

    def __call__(self, request: dict) -> tuple[str, dict]:
        started = time.perf_counter()
        version = self.served.refresh() if self.served else None
        try:
            wanted = self._wanted(request, self._trained())
            volume = self.reader.read(request["image"])
            extension, dtype, compress = self._result_format(request)
        except (PromptError, ImageReadError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        if not slice_axes(volume.array.shape):
            raise HTTPException(status_code=400, detail=f"the image (shape {list(volume.array.shape)}) has no 2D slices")
        result = self.ahead.take((volume.volume_id, tuple(wanted)))
        precomputed = result is not None and result.model_version == version
        if not precomputed:
            with self.background.foreground():
                result = self.compute(volume, wanted, version)
        for name, seg in result.segmentations.items():  # the client's next spd_sam clicks correct these
            self.interactions.start_from(self.session_key(volume, name, request), seg, version, self.prompts.every,
                                         name)
        path = write_label(result.labels, volume.image, extension, dtype, compress)
        release_free_memory()
        total = round(time.perf_counter() - started, 4)
        logger.info("spd_sam_auto%s: %s; %.2fs", " (computed ahead)" if precomputed else "",
                    ", ".join(f"{n} {f['voxels']} voxels" for n, f in result.structures.items()), total)
        return path, {"label_names": {n: self.label_map[n] for n in wanted}, "structures": result.structures,
                      "model_version": version, "precomputed": precomputed, "timing": {"total": total}}

    def precompute(self, image_path: str) -> bool:
        """Start segmenting a volume (the proposed next sample) in the background, so that opening it is instant.

        False when there is nothing to compute: no structure learned yet, or a volume without 2D slices.
        """
        version = self.served.refresh() if self.served else None
        trained = self._trained()
        volume = self.reader.read(image_path)
        if not trained or not slice_axes(volume.array.shape):
            return False
        wanted = sorted(trained, key=self.label_map.get)
        if self.ahead.submit((volume.volume_id, tuple(wanted)), lambda: self.compute(volume, wanted, version)):
            logger.info("spd_sam_auto: computing %s ahead (%s)", image_path, ", ".join(wanted))
        return True

    def compute(self, volume, wanted: list[str], version: int | None) -> AutoResult:
        """Segment each structure in ``wanted`` into one label volume (a voxel goes to the first that takes it)."""
        window = self._window(volume)
        out = np.zeros(volume.array.shape, dtype=np.uint16)
        structures, segmentations = {}, {}
        for name in wanted:
            tic = time.perf_counter()
            seg, prompts, axis = self.pipeline.segment_learned(volume.array, volume.spacing, volume.volume_id, window,
                                                               name, self.prompts)
            if seg is None:
                structures[name] = {"voxels": 0, "confidence": 0.0, "component_mm3": 0.0, "clicks": [],
                                    "slice_axis": axis, "seconds": round(time.perf_counter() - tic, 3)}
                continue
            segmentations[name] = seg
            mask = seg.mask & (out == 0)
            out[mask] = self.label_map[name]
            structures[name] = {"voxels": int(mask.sum()), "confidence": round(prompts.confidence, 3),
                                "component_mm3": round(prompts.volume_mm3, 1),
                                "clicks": [list(c.ijk) for c in prompts.clicks], "slice_axis": axis,
                                "slice_range": list(seg.slice_range), "seconds": round(time.perf_counter() - tic, 3)}
        return AutoResult(out, structures, segmentations, version)

    def _trained(self) -> dict[str, int | None]:
        return {n: a for n, a in self.pipeline.trained_labels().items() if n in self.label_map}

    def _wanted(self, request: dict, trained: dict[str, int | None]) -> list[str]:
        """The labels to segment: those asked for (each must be trained), else every trained one."""
        if not trained:
            raise HTTPException(status_code=409, detail="no structure has been learned yet: save labels and run a "
                                                        "training round (POST /train/spd_sam) first")
        asked = request.get("labels") or ([request["label"]] if request.get("label") not in (None, "") else [])
        if not isinstance(asked, list):
            raise PromptError(f"labels must be a list of label names, got {asked!r}")
        names = [self._resolve_label(a)[0] for a in asked] or sorted(trained, key=self.label_map.get)
        untrained = [n for n in names if n not in trained]
        if untrained:
            raise HTTPException(status_code=409, detail=f"not learned yet: {', '.join(untrained)}; learned: "
                                                        f"{', '.join(trained)}. Save labels of it and run a training round")
        return names
