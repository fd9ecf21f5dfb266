"""The ``spd_sam`` infer task: a MONAI Label request in, a label volume and the SPD record out."""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.infers.memory_trim import release_free_memory
from lib.request_flags import parse_flag
from lib.spd.method import Interactions, SPDPipeline, VolumeView, choose_window, segment_range
from lib.spd.method.prompts import (PromptError, choose_slice_axis, parse_clicks, parse_roi, require_foreground, slice_axes,
                                    training_axis)
from lib.spd.serving import BackgroundEmbedder, ModelReloader
from lib.volume_io import RESULT_DTYPES, RESULT_EXTENSIONS, ImageReadError, VolumeReader, write_label

logger = logging.getLogger(__name__)

UNLABELLED = "foreground"  # name reported when a viewer sends no label (OHIF's point prompts)


def focus_bounds(seg) -> list[list[int]] | None:
    """The block whose masks were decoded, as inclusive ``[[i0, i1], [j0, j1], [k0, k1]]`` (None: whole slices)."""
    if seg.focus is None:
        return None
    bounds = [None, None, None]
    bounds[seg.axis] = list(seg.slice_range)
    for a, span in zip([a for a in range(3) if a != seg.axis], seg.focus):
        bounds[a] = [span.start, span.stop - 1]
    return bounds


class SPDInfer(InferTask):
    """Deepgrow-type task: weak clicks on one structure -> its 3D mask.

    Args:
        pipeline: the SPD pipeline (backbone, cache, saliency heads).
        labels: label name -> value written into the result.
        background: worker that embeds the rest of a volume after a request.
        modality: "auto", "CT" or "MR" (intensity window).
        served: the published trained model, checked for a newer version at every request.
        interactions: the interaction sessions (shared with ``spd_sam_auto``, whose results later clicks correct).
        draft: answer a first request on a cold volume with a draft (``draft.py``) unless the request says otherwise.
    """

    def __init__(self, pipeline: SPDPipeline, labels: dict[str, int], background: BackgroundEmbedder,
                 modality: str = "auto", served: ModelReloader | None = None, interactions: Interactions | None = None,
                 draft: bool = False):
        super().__init__(
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=3,
            description="SPD-SAM: 3D segmentation from a few rough clicks (saliency-guided prompt distillation)",
            config={"backbone": pipeline.backbone.name, "draft": draft},  # viewers show and send these options
        )
        self.pipeline = pipeline
        self.label_map = labels
        self.background = background
        self.modality = modality
        self.served = served
        self.interactions = interactions or Interactions(pipeline)
        self.reader = VolumeReader()
        self._windows: dict[str, Any] = {}

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict) -> tuple[str, dict]:
        started = time.perf_counter()
        try:
            volume = self.reader.read(request["image"])
            label_name, label_value = self._resolve_label(request.get("label"))
            roi = parse_roi(request.get("roi"), volume.array.shape)
            version = self.served.refresh() if self.served else None
            session = self.session_key(volume, label_name, request)
            clicks = parse_clicks(request, volume.array.shape, box=True)
            requested_axis = request.get("slice_axis")
            require_foreground(clicks, roi is not None  # negative clicks alone may correct a result (spd_sam_auto's)
                               or self.interactions.continues(session, clicks, requested_axis, roi, version))
            choose_slice_axis(clicks, volume.spacing, requested_axis, volume.array.shape)  # 400 on a bad axis
            extension, dtype, compress = self._result_format(request)
            focus = parse_flag(request.get("focus", True), "focus", PromptError)
            draft = parse_flag(request.get("draft", self.config()["draft"]), "draft", PromptError)
        except (PromptError, ImageReadError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        loaded = time.perf_counter()

        window = self._window(volume)
        with self.background.foreground():
            outcome = self.interactions.run(session, volume.array, volume.spacing, volume.volume_id, clicks, window,
                                            label=label_name, slice_axis=requested_axis, roi=roi, focus=focus,
                                            model_version=version, draft=draft)
        seg = outcome.segmentation
        whole = VolumeView(volume.array, seg.axis, window)
        self._embed_rest_later(volume, whole, around=sum(seg.slice_range) // 2)
        if seg.draft is not None and seg.focus is not None:  # the full result likely decodes there too
            first, last = segment_range(clicks, seg.axis, whole.depth, roi)
            self._embed_later(volume, whole.focused(seg.focus), range(first, last + 1))

        written = time.perf_counter()
        path = write_label(seg.mask.astype("uint8") * label_value, volume.image, extension, dtype, compress)
        release_free_memory()
        timings = {"load": round(loaded - started, 4), **seg.timings,
                   "write": round(time.perf_counter() - written, 4),
                   "total": round(time.perf_counter() - started, 4)}
        result = {
            "label_names": {label_name: label_value},
            "consensus": seg.consensus,
            "slice_axis": seg.axis,
            "saliency": seg.saliency,
            "box_probes": seg.box_probes,
            "slice_range": list(seg.slice_range),
            "focus": focus_bounds(seg),
            "predicted_iou": seg.predicted_iou,
            "draft": seg.draft,  # a quick answer from the clicked slices; the same request again refines it
            "voxels": int(seg.mask.sum()),
            "interaction": outcome.record,  # new session, correction (what it changed) or unchanged
            "backbone": {"name": self.pipeline.backbone.name, "runtime": self.pipeline.backbone.runtime,
                         "device": str(self.pipeline.backbone.device)},
            "model_version": version,  # published trained checkpoint in use (None: untrained)
            "timing": timings,
        }
        c, i = seg.consensus, outcome.record
        if i["mode"] != "new":
            logger.info("spd_sam %s: %s (step %d, %d clicks): +%d / -%d voxels on slices %s; %d voxels; %.2fs",
                        label_name, i["mode"], i["step"], i["clicks"], i["voxels_added"], i["voxels_removed"],
                        i["slices_changed"], result["voxels"], timings["total"])
            return path, result
        logger.info("spd_sam %s: %d kept, %d moved, %d rejected, %d added; slices %s on axis %d; %d voxels; %.2fs%s",
                    label_name, len(c["kept"]), len(c["moved"]), len(c["rejected"]), len(c["added"]),
                    seg.slice_range, seg.axis, result["voxels"], timings["total"],
                    "" if seg.draft is None else f"; a draft from {seg.draft['slices_segmented']} clicked slices, "
                    f"{seg.draft['slices_to_embed']} more slices embed in the background")
        return path, result

    @staticmethod
    def session_key(volume, label_name: str, request: dict) -> tuple[str, str, str]:
        """Interaction sessions are per image, label and client (clients without an id share one)."""
        return volume.volume_id, label_name, str(request.get("client_id") or "")

    def prefetch(self, image_path: str) -> None:
        """Queue background embedding of a volume along its coarsest axis (e.g. a proposed next sample)."""
        volume = self.reader.read(image_path)
        if not slice_axes(volume.array.shape):
            return  # no 2D slices (a line of voxels): nothing a click could use
        axis = training_axis(volume.spacing, volume.array.shape)
        view = VolumeView(volume.array, axis, self._window(volume))
        self._embed_rest_later(volume, view, around=view.depth // 2)

    def _embed_rest_later(self, volume, view: VolumeView, around: int) -> None:
        """Queue every slice of ``view``, from slice ``around`` outward."""
        self._embed_later(volume, view, sorted(range(view.depth), key=lambda s: abs(s - around)))

    def _embed_later(self, volume, view: VolumeView, slices: Sequence[int]) -> None:
        """Queue ``slices`` of ``view`` (in that order) ahead of earlier jobs."""
        key = self.pipeline.cache_key(volume.volume_id, view)
        self.background.submit(key, lambda: self.pipeline.cache.missing(key, slices),
                               lambda todo: self.pipeline.embed(volume.volume_id, view, todo))

    def _window(self, volume):
        if volume.volume_id not in self._windows:
            self._windows[volume.volume_id] = choose_window(volume.array, self.modality)
        return self._windows[volume.volume_id]

    def _resolve_label(self, label: Any) -> tuple[str, int]:
        if label is None or label == "":
            return UNLABELLED, 1
        if isinstance(label, str) and label in self.label_map:
            return label, self.label_map[label]
        if isinstance(label, int) and not isinstance(label, bool) and label in self.label_map.values():
            return next(n for n, v in self.label_map.items() if v == label), label
        raise PromptError(f"unknown label {label!r}; known labels: {', '.join(self.label_map)}")

    @staticmethod
    def _result_format(request: dict) -> tuple[str, str, bool]:
        extension = request.get("result_extension") or ".nii.gz"
        dtype = request.get("result_dtype") or "uint8"
        if extension not in RESULT_EXTENSIONS:
            raise PromptError(f"result_extension must be one of {', '.join(RESULT_EXTENSIONS)}, got {extension!r}")
        if dtype not in RESULT_DTYPES:
            raise PromptError(f"result_dtype must be one of {', '.join(RESULT_DTYPES)}, got {dtype!r}")
        return extension, dtype, parse_flag(request.get("result_compress", True), "result_compress", PromptError)
