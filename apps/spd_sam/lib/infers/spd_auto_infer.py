"""The ``spd_sam_auto`` infer task: no clicks; every structure the served model has learned, in one label volume."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.memory_trim import release_free_memory
from lib.infers.spd_infer import SPDInfer
from lib.spd.method import VolumeView, training_axis
from lib.spd.method.prompts import PromptError, slice_axes
from lib.spd.method.self_prompts import SelfPromptConfig, self_prompts
from lib.volume_io import ImageReadError, write_label

logger = logging.getLogger(__name__)


class SPDAutoInfer(SPDInfer):
    """Segmentation-type task (Slicer's *Auto Segmentation*, OHIF's segmentation mode): the trained saliency
    heads place the clicks themselves (``self_prompts``) and the SPD pipeline segments each learned structure.

    Shares the pipeline, embedding cache, published model and interaction sessions with ``spd_sam`` (same
    arguments as :class:`SPDInfer`): each structure's result becomes the client's session for it, so the clicks
    it sends next to ``spd_sam`` correct the auto segmentation. Params: optional ``label`` (a name) or ``labels``
    (a list of names) to segment only those; the result format params of ``spd_sam``.
    """

    def __init__(self, *args, prompts: SelfPromptConfig = SelfPromptConfig(), **kwargs):
        super().__init__(*args, **kwargs)
        self.type = InferType.SEGMENTATION
        self.description = ("SPD-SAM auto: every structure the served model has learned, without clicks "
                            "(needs a training round first)")
        self.prompts = prompts

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
        trained = {n: a for n, a in self.pipeline.trained_labels().items() if n in self.label_map}
        try:
            wanted = self._wanted(request, trained)
            volume = self.reader.read(request["image"])
            extension, dtype, compress = self._result_format(request)
        except (PromptError, ImageReadError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        if not slice_axes(volume.array.shape):
            raise HTTPException(status_code=400, detail=f"the image (shape {list(volume.array.shape)}) has no 2D slices")
        window = self._window(volume)
        out = np.zeros(volume.array.shape, dtype=np.uint16)
        found: dict[str, dict] = {}
        with self.background.foreground():
            for name in wanted:
                axis = trained[name]
                if axis is None or axis not in slice_axes(volume.array.shape):
                    axis = training_axis(volume.spacing, volume.array.shape)
                found[name] = self._segment(volume, window, name, axis, out, request, version)
        path = write_label(out, volume.image, extension, dtype, compress)
        release_free_memory()
        total = round(time.perf_counter() - started, 4)
        logger.info("spd_sam_auto: %s; %.2fs", ", ".join(f"{n} {f['voxels']} voxels" for n, f in found.items()), total)
        return path, {"label_names": {n: self.label_map[n] for n in wanted}, "structures": found,
                      "model_version": version, "timing": {"total": total}}

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

    def _segment(self, volume, window, name: str, axis: int, out: np.ndarray, request: dict, version: int | None
                 ) -> dict:
        """Segment one learned structure into ``out`` (voxels other structures took are left to them) and make it the
        client's interaction session for that structure."""
        tic = time.perf_counter()
        view = VolumeView(volume.array, axis, window)
        saliency = self.pipeline.saliency_volume(volume.volume_id, view, name)
        prior = self.pipeline.state.size_priors.get(name)
        prompts = self_prompts(saliency, axis, volume.spacing, self.prompts, prior.volume_mm3 if prior else None)
        if prompts is None:
            return {"voxels": 0, "confidence": 0.0, "component_mm3": 0.0, "clicks": [], "slice_axis": axis,
                    "seconds": round(time.perf_counter() - tic, 3)}
        seg = self.pipeline.segment(volume.array, volume.spacing, volume.volume_id, prompts.clicks, window,
                                    label=name, slice_axis=axis)
        self.interactions.start_from(self.session_key(volume, name, request), seg, version, self.prompts.every)
        mask = seg.mask & (out == 0)
        out[mask] = self.label_map[name]
        return {"voxels": int(mask.sum()), "confidence": round(prompts.confidence, 3),
                "component_mm3": round(prompts.volume_mm3, 1),
                "clicks": [list(c.ijk) for c in prompts.clicks], "slice_axis": axis,
                "slice_range": list(seg.slice_range), "seconds": round(time.perf_counter() - tic, 3)}
