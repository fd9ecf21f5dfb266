"""The SPD volume pipeline: clicks -> slice range -> embeddings -> saliency -> CPD -> decoding -> 3D mask."""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ..runtime.backbones import Backbone, PromptBatch
from ..runtime.mask_memo import MaskMemo
from .anchor_chain import AnchorChain
from .assembly import bounding_box, keep_prompted_components, trim_unanchored_ends
from .box_probing import ProbeConfig, cover_salient_boxes, mask_boxes, probe_anchor_masks, probe_boxes, probe_centres
from .distillation import Consensus, ContextualPromptDistiller, CPDConfig
from .draft import DraftConfig, fill_between
from .focus import FocusConfig, Region, focus_region
from .hot_slabs import HotSlabs
from .intensity import IntensityWindow, as_tensor
from .prompts import Click, choose_slice_axis, slice_axes, to_slice_clicks, training_axis
from .saliency import AppearanceSaliency
from .saliency_head import GridMemo
from .self_prompts import SelfPromptConfig, SelfPrompts, self_prompts
from .trained_state import TrainedState

if TYPE_CHECKING:  # the cache is serving infrastructure, handed in by whoever builds the pipeline
    from ..serving.embedding_cache import EmbeddingCache

REMEMBERED_REGIONS = 256  # structures whose last focus region is kept


@dataclass
class Segmentation:
    """A 3D mask and how it was made."""

    mask: np.ndarray
    axis: int
    slice_range: tuple[int, int]
    consensus: dict
    timings: dict = field(default_factory=dict)
    saliency: str = "appearance"  # or "trained head (axis N)"
    box_probes: str = "default sizes"  # or "learned sizes (axis N)"
    focus: Region | None = None  # the in-plane region (rows, cols) decoded in; None: whole slices
    prompts: Consensus | None = None  # the consensus prompts (with boxes) the masks were decoded from
    predicted_iou: dict = field(default_factory=dict)  # mean IoU the decoder predicted: per place compared, and served
    draft: dict | None = None  # a draft (see ``draft.py``): slices segmented, filled and still to embed; None: final


@dataclass
class VolumeView:
    """A volume seen as a stack of slices along one axis, windowed on demand; with a ``region``, only that
    part (rows, cols) of each slice; with ``picked``, only those slices (in that order: slice n of the view is
    slice ``picked[n]`` of the volume)."""

    volume: np.ndarray
    axis: int
    window: IntensityWindow
    region: Region | None = None
    picked: tuple[int, ...] | None = None

    @property
    def in_plane(self) -> list[int]:
        return [a for a in range(3) if a != self.axis]

    @property
    def slice_shape(self) -> tuple[int, int]:
        if self.region is not None:
            return tuple(r.stop - r.start for r in self.region)
        return tuple(self.volume.shape[a] for a in self.in_plane)

    @property
    def origin(self) -> tuple[int, int]:
        """Where the view's pixel (0, 0) lies on the volume's slices."""
        return (0, 0) if self.region is None else (self.region[0].start, self.region[1].start)

    @property
    def depth(self) -> int:
        return self.volume.shape[self.axis] if self.picked is None else len(self.picked)

    def focused(self, region: Region | None) -> "VolumeView":
        """The same slices, cut to ``region`` (None: whole)."""
        return replace(self, region=region)

    def source(self, indices: Sequence[int]) -> list[int]:
        """The volume's slice index of each of the view's slices ``indices``."""
        return list(indices) if self.picked is None else [self.picked[n] for n in indices]

    def slices(self, indices: Sequence[int]) -> np.ndarray:
        """(N, H, W) float32 in [0, 1]; rows and columns are the remaining axes in order (cut to the region)."""
        return self.window.apply(self._planes(indices))

    def on_device(self, indices: Sequence[int], device: torch.device) -> torch.Tensor:
        """:meth:`slices` as a tensor on ``device``, windowed there: the voxels travel as stored (int16 CT: half the
        bytes of floats), and the host does no arithmetic on them."""
        return self.window.apply(self.voxels(indices).to(device))

    def voxels(self, indices: Sequence[int]) -> torch.Tensor:
        """The voxels of slices ``indices`` as stored, a (N, H, W) host tensor cut to the region."""
        return as_tensor(self._planes(indices))

    def _planes(self, indices: Sequence[int]) -> np.ndarray:
        planes = np.moveaxis(np.take(self.volume, self.source(indices), axis=self.axis), self.axis, 0)
        return planes if self.region is None else planes[(slice(None), *self.region)]


@dataclass
class Plan:
    """What :meth:`SPDPipeline.plan` prepares for decoding one structure."""

    view: VolumeView
    first: int  # slice index of embeddings[0]
    key: str  # cache key of the view
    embeddings: torch.Tensor  # (N, C, g, g) of slices first .. first + N - 1
    saliency: torch.Tensor  # (N, H, W) in [0, 1], on the backbone's device
    consensus: Consensus  # prompts with a box on every slice
    timings: dict = field(default_factory=dict)
    saliency_source: str = "appearance"  # which saliency the consensus was built on
    probe_source: str = "default sizes"  # which probe sizes measured the anchored slices' boxes


def click_gap(click_slices: Sequence[int]) -> int:
    """The typical number of slices between the annotator's clicked slices (at least 2; 2 for one clicked slice)."""
    unique = np.unique(click_slices)
    return max(2, int(np.median(np.diff(unique)))) if unique.size > 1 else 2


def slice_margin(click_slices: Sequence[int]) -> int:
    """Slices to segment beyond the outermost clicks: half the typical gap between clicks (2 for one clicked slice).

    An annotator who clicks every few slices starts and stops somewhere within one gap of a structure's ends, on
    average half a gap inside them; ``trim_unanchored_ends`` then drops the slices where it has ended. Segmenting a
    whole gap past the ends added slices beyond small structures that the trim, on untrained saliency, kept.
    """
    return click_gap(click_slices) // 2 if np.unique(click_slices).size > 1 else 2


def segment_range(clicks: Sequence[Click], axis: int, depth: int, roi) -> tuple[int, int]:
    """First and last slice along ``axis`` that SPD segments: the positive clicks' slices and
    :func:`slice_margin` beyond them, within the roi and the ``depth`` slices."""
    fg_slices = [c.ijk[axis] for c in clicks if c.positive]
    margin = slice_margin(fg_slices)
    lo, hi = (0, depth - 1) if roi is None else roi[axis]
    return max(min(fg_slices) - margin, lo), min(max(fg_slices) + margin, hi)


class SPDPipeline:
    """Segments one structure in a volume from weak clicks.

    Args:
        backbone: the SAM-family model (see ``backbones.load_backbone``).
        cache: slice embedding cache shared by all requests.
        state: the trained state to serve (default: untrained; see :meth:`serve`).
        cpd: distillation tolerances.
        probes: default box probe sizes for measuring the structure on validated slices.
        focus: how the region around a structure's boxes is chosen that its masks are decoded in (None: whole
            slices).
        decode_chunk: slices decoded per call (None: the backbone's ``decode_chunk``).
        draft: when a request that asks for it is answered with a draft.
    """

    def __init__(
        self,
        backbone: Backbone,
        cache: EmbeddingCache,
        state: TrainedState = TrainedState(),
        cpd: CPDConfig = CPDConfig(),
        probes: ProbeConfig = ProbeConfig(),
        focus: FocusConfig | None = FocusConfig(),
        decode_chunk: int | None = None,
        draft: DraftConfig = DraftConfig(),
    ):
        self.backbone = backbone
        self.cache = cache
        self.cpd = cpd
        self.probes = probes
        self.focus = focus
        self.decode_chunk = decode_chunk or backbone.decode_chunk
        self.draft = draft
        self.base_decoder = backbone.model.mask_decoder  # the backbone's own weights: served by states without one
        self.fallback_saliency = AppearanceSaliency()
        self._hot_embeddings = HotSlabs(2, 1 << 30)  # a structure's whole slices and its focus region
        self._hot_images = HotSlabs(1, 512 << 20)  # the windowed slices appearance saliency reads
        self._regions: OrderedDict[tuple, Region] = OrderedDict()  # (volume, axis, label) -> its last focus region
        self.serve(state)

    @property
    def state(self) -> TrainedState:
        """The trained state in service."""
        return self._state

    def serve(self, state: TrainedState) -> None:
        """Switch to ``state`` as a whole: its encoder adapters (embeddings are then keyed by them), its
        decoder, heads and size priors; remembered masks and head maps are forgotten."""
        self.backbone.install_adapters(state.adapters)
        self.backbone.model.mask_decoder = self.base_decoder if state.decoder is None else state.decoder
        self._state = state
        self.memo = MaskMemo()
        self.head_maps = GridMemo()
        self._hot_embeddings.clear()

    def cache_key(self, volume_id: str, view: VolumeView) -> str:
        """Names the embeddings of one volume seen along one axis (and region) by one backbone and window; a view
        of picked slices gets its own name (its slice indices mean other slices), its embeddings are cached under
        the name of the view of all slices."""
        w = view.window
        key = f"{volume_id}-ax{view.axis}-{self.backbone.name}-{self.backbone.embedding_id}-{w.low:.6g}_{w.high:.6g}"
        if view.region is not None:
            (r0, c0), (rows, cols) = view.origin, view.slice_shape
            key += f"-at{r0}_{c0}_{rows}x{cols}"
        if view.picked is not None:
            key += f"-picked{zlib.crc32(np.asarray(view.picked, dtype=np.int64).tobytes()):08x}"
        return key

    def probe_config(self, label: str | None, axis: int) -> ProbeConfig:
        """Probe sizes for ``label`` on slices along ``axis``: learned from its saved labels, else the defaults."""
        prior = self.state.size_priors.get(label)
        return prior.probes(self.probes) if prior is not None and prior.axis == axis else self.probes

    def trained_labels(self) -> dict[str, int | None]:
        """Labels with a trained saliency head, and the slice axis each head was trained on (None: unknown)."""
        return {name: head.head.axis for name, head in self.state.saliency_heads.items()}

    def saliency_volume(self, volume_id: str, view: VolumeView, label: str, chunk: int = 32) -> np.ndarray:
        """(depth, H, W) saliency of ``label``'s trained head on every slice of ``view``, embedded chunk by chunk
        through the cache."""
        chunks = [list(range(start, min(start + chunk, view.depth))) for start in range(0, view.depth, chunk)]
        return torch.cat([self._head_maps(volume_id, view, label, indices) for indices in chunks]).cpu().numpy()

    def knows(self, label: str | None, axis: int) -> bool:
        """Whether a trained saliency head of ``label`` serves slices along ``axis`` (a head knows nothing of other
        axes' slices)."""
        head = self.state.saliency_heads.get(label)
        return head is not None and head.head.serves(axis)

    def trained_saliency(self, volume_id: str, view: VolumeView, label: str | None, indices: Sequence[int]
                         ) -> np.ndarray | None:
        """(len(indices), H, W) saliency of ``label``'s trained head on slices ``indices`` of ``view`` (whole
        slices: the head learned them); None when no head of that label serves the view's axis."""
        if not self.knows(label, view.axis):
            return None
        return self._head_maps(volume_id, view, label, list(indices)).cpu().numpy()

    def _head_maps(self, volume_id: str, view: VolumeView, label: str, indices: list[int],
                   embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H, W) maps of ``label``'s trained head on slices ``indices`` of ``view``, remembered per slice;
        ``embeddings``: those of ``indices`` where the caller has them (else the slices not remembered are embedded
        through the cache)."""
        head = self.state.saliency_heads[label]

        def compute(positions: list[int]) -> torch.Tensor:
            if embeddings is not None:
                return head.grids(embeddings[positions])
            return head.grids(self.embed(volume_id, view, [indices[p] for p in positions]))

        return head.to_slices(self.head_maps.grids((self.cache_key(volume_id, view), label), indices, compute),
                              view.slice_shape)

    def segment_learned(self, volume: np.ndarray, spacing: Sequence[float], volume_id: str, window: IntensityWindow,
                        label: str, config: SelfPromptConfig = SelfPromptConfig()
                        ) -> tuple[Segmentation | None, SelfPrompts | None, int]:
        """A learned structure without clicks: its trained head's clicks (``self_prompts``) through :meth:`segment`.

        Slices run along the axis the head was trained on (the volume's coarsest one where that is unknown or
        not a slice axis of this volume). Returns the segmentation and the self-prompts (both None when the head
        finds no structure) and the slice axis.
        """
        axis = self.trained_labels()[label]
        if axis is None or axis not in slice_axes(volume.shape):
            axis = training_axis(spacing, volume.shape)
        saliency = self.saliency_volume(volume_id, VolumeView(volume, axis, window), label)
        prior = self.state.size_priors.get(label)
        prompts = self_prompts(saliency, axis, spacing, config, prior.volume_mm3 if prior else None)
        if prompts is None:
            return None, None, axis
        return self.segment(volume, spacing, volume_id, prompts.clicks, window, label=label, slice_axis=axis), prompts, axis

    def embed(self, volume_id: str, view: VolumeView, indices: Sequence[int], device: torch.device | str = "cpu"
              ) -> torch.Tensor:
        """Embeddings of the given slices on ``device``, through the cache (missing slices are read chunk by chunk
        and windowed on the encoder's device; those embedded on ``device`` stay there)."""
        stack = replace(view, picked=None)
        return self.cache.get(self.cache_key(volume_id, stack), view.source(indices),
                              lambda todo: self.backbone.embed_lazily(stack.voxels, todo, view.slice_shape,
                                                                      stack.window.apply), device)

    def segment(
        self,
        volume: np.ndarray,
        spacing: Sequence[float],
        volume_id: str,
        clicks: Sequence[Click],
        window: IntensityWindow,
        label: str | None = None,
        slice_axis: int | None = None,
        roi: tuple[tuple[int, int], ...] | None = None,
        focus: bool = True,
        draft: bool = False,
        picked: tuple[int, ...] | None = None,
    ) -> Segmentation:
        """Run SPD for one structure.

        Args:
            volume: (I, J, K) image as stored.
            spacing: voxel size in mm per axis.
            volume_id: stable id of the volume content (cache key).
            clicks: validated clicks (IJK).
            window: intensity window of the volume.
            label: structure name, selects a trained saliency head.
            slice_axis: axis to segment along (None: chosen from the clicks).
            roi: optional ((i0, i1), (j0, j1), (k0, k1)) bounds; nothing is segmented outside.
            focus: also consider decoding on a region around the consensus boxes, embedded on its own at the
                encoder's full input size (see ``focus.py``), when the pipeline has a focus config: the place
                whose masks on the anchored slices the decoder predicts the higher mean IoU for is decoded. False:
                whole slices.
            draft: answer with a draft (``draft.py``) when the pipeline's draft config says it saves enough.
            picked: segment only these slices along ``slice_axis`` (which must be given), as a stack of their own:
                the clicks and ``roi`` then index that stack along the axis.
        """
        if draft:
            drafted = self._draft(volume, spacing, volume_id, clicks, window, label, slice_axis, roi, focus)
            if drafted is not None:
                return drafted
        plan = self.plan(volume, spacing, volume_id, clicks, window, label, slice_axis, roi, picked=picked)
        timings, view, saliency, first = plan.timings, plan.view, plan.saliency, plan.first
        indices = list(range(first, first + len(plan.embeddings)))
        region, embeddings, scores = None, plan.embeddings, {}
        if focus and self.focus is not None:
            boxes = np.array([plan.consensus.prompts[s].box for s in indices])
            pixel_mm = [float(spacing[a]) for a in view.in_plane]
            region = self._focus_region((volume_id, view.axis, label), boxes.reshape(-1, 2), pixel_mm, view.slice_shape)
        if region is not None:
            tic = time.perf_counter()
            scores = self._rate_places(volume_id, plan, view.focused(region))
            if scores["focus square"] >= scores["whole slices"]:
                view, saliency = view.focused(region), saliency[(slice(None), *region)]
                embeddings = self._embeddings_on_device(volume_id, view, indices)
            else:  # the decoder trusts its whole-slice masks more (as on the CT tube phantom)
                region = None
            timings["place"] = round(time.perf_counter() - tic, 4)
        tic = time.perf_counter()
        masks, predicted = self._decode(self.cache_key(volume_id, view), embeddings, plan.consensus, saliency, indices,
                                        view)  # the anchored slices of the place chosen are remembered
        scores["served"] = round(float(predicted.mean()), 4)
        timings["decode"] = round(time.perf_counter() - tic, 4)
        tic = time.perf_counter()
        mask = self._assemble(masks, saliency, plan.consensus, view, first, roi)
        timings["assemble"] = round(time.perf_counter() - tic, 4)
        return Segmentation(mask, view.axis, (first, indices[-1]), plan.consensus.record(view.in_plane, view.axis),
                            timings, plan.saliency_source, plan.probe_source, region, plan.consensus, scores)

    def _draft(self, volume, spacing, volume_id, clicks, window, label, slice_axis, roi, focus) -> Segmentation | None:
        """:meth:`segment` on the clicked slices alone, the slices between them filled (``draft.py``); None when
        fewer than ``draft.min_saved`` other slices of the range are still to be embedded."""
        axis = choose_slice_axis(clicks, spacing, slice_axis, volume.shape)
        whole = VolumeView(volume, axis, window)
        first, last = segment_range(clicks, axis, whole.depth, roi)
        picked = sorted({c.ijk[axis] for c in clicks if c.positive and first <= c.ijk[axis] <= last})
        todo = set(self.cache.missing(self.cache_key(volume_id, whole), range(first, last + 1))) - set(picked)
        if len(picked) < 2 or len(todo) < self.draft.min_saved:
            return None
        at = {s: n for n, s in enumerate(picked)}
        kept = [n for n, c in enumerate(clicks) if c.ijk[axis] in at]  # negative clicks between them wait
        stacked = [Click(tuple(at[v] if a == axis else v for a, v in enumerate(clicks[n].ijk)), clicks[n].positive)
                   for n in kept]
        sub_roi = None if roi is None else tuple((0, len(picked) - 1) if a == axis else r for a, r in enumerate(roi))
        seg = self.segment(volume, spacing, volume_id, stacked, window, label, axis, sub_roi, focus,
                           picked=tuple(picked))
        tic = time.perf_counter()
        filled = fill_between(np.moveaxis(seg.mask, axis, 0)[:len(picked)], picked,
                              [float(spacing[a]) for a in whole.in_plane])
        mask = np.zeros(volume.shape, dtype=bool)
        np.moveaxis(mask, axis, 0)[picked[0]:picked[-1] + 1] = filled
        timings = {**seg.timings, "fill": round(time.perf_counter() - tic, 4)}
        return replace(seg, mask=mask, slice_range=(picked[0], picked[-1]), timings=timings, prompts=None,
                       consensus=_unpicked(seg.consensus, picked, kept, axis),
                       draft={"slices_segmented": len(picked), "slices_filled": picked[-1] - picked[0] + 1 - len(picked),
                              "slices_to_embed": len(todo)})

    def _rate_places(self, volume_id: str, plan: Plan, focused: VolumeView) -> dict[str, float]:
        """Mean IoU that the decoder predicts for its masks of the clicked slices on whole slices and on the
        focus square ``focused`` (whose clicked slices alone are embedded here); both decodings are remembered."""
        anchored = sorted(s for s, p in plan.consensus.prompts.items() if p.anchored)
        rows = [s - plan.first for s in anchored]
        saliency = plan.saliency[rows]
        _, whole = self._decode(plan.key, plan.embeddings[rows], plan.consensus, saliency, anchored, plan.view)
        embeddings = self._embeddings_on_device(volume_id, focused, anchored)
        _, square = self._decode(self.cache_key(volume_id, focused), embeddings, plan.consensus,
                                 saliency[(slice(None), *focused.region)], anchored, focused)
        return {"whole slices": round(float(whole.mean()), 4), "focus square": round(float(square.mean()), 4)}

    def plan(
        self,
        volume: np.ndarray,
        spacing: Sequence[float],
        volume_id: str,
        clicks: Sequence[Click],
        window: IntensityWindow,
        label: str | None = None,
        slice_axis: int | None = None,
        roi: tuple[tuple[int, int], ...] | None = None,
        anchor_boxes: Callable[[dict[int, np.ndarray]], dict[int, tuple[float, float, float, float]]] | None = None,
        picked: tuple[int, ...] | None = None,
    ) -> Plan:
        """Everything before decoding, on whole slices: slice range, embeddings, saliency and consensus prompts
        with boxes.

        Arguments as in :meth:`segment`, plus ``anchor_boxes``: measures the box of each anchored slice
        from its consensus point (slice -> (row, col)) instead of probing the decoder; training
        passes the boxes a perfect decoder would give.
        """
        timings: dict[str, float] = {}
        tic = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal tic
            now = time.perf_counter()
            timings[name] = round(now - tic, 4)
            tic = now

        axis = choose_slice_axis(clicks, spacing, slice_axis, volume.shape)
        view = VolumeView(volume, axis, window, picked=picked)
        sclicks = to_slice_clicks(clicks, axis)
        first, last = segment_range(clicks, axis, view.depth, roi)
        indices = list(range(first, last + 1))
        sclicks = [c for c in sclicks if first <= c.slice <= last]
        lap("prepare")

        embeddings = self._embeddings_on_device(volume_id, view, indices)
        lap("embed")

        pixel_mm = tuple(float(spacing[a]) for a in view.in_plane)
        distiller = ContextualPromptDistiller(pixel_mm, self.cpd)
        # appearance is sampled under the clicks and under the points their cross-slice line puts on clicked slices
        samples = [(c.slice - first, c.row, c.col) for c in sclicks if c.positive]
        samples += [(s - first, r, c) for s, r, c in distiller.line_points(sclicks, view.slice_shape)]
        trained = self.knows(label, axis)
        if trained:
            saliency = self._head_maps(volume_id, view, label, indices, embeddings).to(self.backbone.device)
        else:
            saliency = self.fallback_saliency(self._images_on_device(volume_id, view, indices), embeddings, samples)
        lap("saliency")

        consensus = distiller.distill(sclicks, saliency, first)
        lap("distill")

        key = self.cache_key(volume_id, view)

        def probe(at: list[int], boxes: np.ndarray) -> torch.Tensor:
            return self._masks(key, at, embeddings[[s - first for s in at]], PromptBatch(boxes=boxes), view.slice_shape)[0]

        anchors = {s: np.mean(p.positives, axis=0) for s, p in consensus.prompts.items() if p.anchored}
        probes = self.probe_config(label, axis)
        anchors = probe_centres(saliency, anchors, first, pixel_mm, probes.centre_mm, self.cpd.saliency_threshold)
        if anchor_boxes is None:
            # a GPU decodes a batch of every probe in about the time of one; a CPU pays for each
            masks, typical = probe_anchor_masks(probe, anchors, pixel_mm, view.slice_shape, probes,
                                                all_levels_at_once=embeddings.device.type == "cuda")

            def reprobe(s: int, centre: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
                centre = probe_centres(saliency, {s: centre}, first, pixel_mm, probes.centre_mm,
                                       self.cpd.saliency_threshold)[s]
                boxes = np.array(probe_boxes(centre, np.asarray(pixel_mm), view.slice_shape, probes), dtype=np.float32)
                return probe([s] * len(boxes), boxes), centre

            # only a structure of steady size is judged by its neighbours: where the size changes along the
            # slices, overlap alone does not tell a drifted anchor from a good one
            moved = AnchorChain(typical).follow(masks, reprobe) if typical is not None else {}
            for s, (centre, trusted) in moved.items():
                anchors[s] = centre
                consensus.move_anchor(s, centre, f"moved: its mask did not overlap, at the structure's size, the mask of "
                                                 f"the adjacent anchored slice {trusted} on the longest run of "
                                                 f"overlapping anchors; probed again around the centre of that mask")
            measured = mask_boxes(masks, anchors, pixel_mm, view.slice_shape, probes)
            if trained:  # what the head learned of the structure's extent, where the probes stopped short of it
                measured = cover_salient_boxes(measured, saliency, anchors, first, pixel_mm, probes.pad_mm,
                                               self.cpd.saliency_threshold)
        else:
            measured = anchor_boxes(anchors)
        consensus.assign_boxes(measured)
        lap("calibrate")
        return Plan(view, first, key, embeddings, saliency, consensus, timings,
                    f"trained head (axis {axis})" if trained else "appearance",
                    "default sizes" if probes is self.probes else f"learned sizes (axis {axis})")

    def _focus_region(self, structure: tuple, corners: np.ndarray, pixel_mm, shape) -> Region | None:
        """:func:`focus_region` around the boxes' corners, keeping a structure's last region while its boxes fit
        in it (a correction then reuses the region's embeddings)."""
        region = focus_region(corners, pixel_mm, shape, self.focus, self._regions.pop(structure, None))
        if region is not None:
            self._regions[structure] = region
            while len(self._regions) > REMEMBERED_REGIONS:
                self._regions.popitem(last=False)
        return region

    def _embeddings_on_device(self, volume_id: str, view: VolumeView, indices: list[int]) -> torch.Tensor:
        """Embeddings of slices ``indices`` (ascending) on the backbone's device; a re-click on the same structure
        finds them in the last slabs (:class:`HotSlabs`), copying and stacking nothing."""
        return self._hot_embeddings.fetch(self.cache_key(volume_id, view), indices,
                                          lambda: self.embed(volume_id, view, indices, self.backbone.device))

    def _images_on_device(self, volume_id: str, view: VolumeView, indices: list[int]) -> torch.Tensor:
        """Slices ``indices`` (consecutive) of ``view`` windowed on the backbone's device, kept for a re-click."""
        return self._hot_images.fetch(self.cache_key(volume_id, view), indices,
                                      lambda: view.on_device(indices, self.backbone.device))

    def decode_slices(self, volume_id: str, view: VolumeView, slices: list[int], prompts: PromptBatch) -> np.ndarray:
        """(N, H, W) masks on whole slices of ``slices`` (consecutive) from prompts in whole-slice pixels, decoded
        on the view's region (nothing outside it); points go only to point-trained backbones."""
        (r0, c0), (h, w) = view.origin, view.slice_shape
        boxes = None if prompts.boxes is None else np.clip(prompts.boxes - [r0, c0, r0, c0], 0, [h - 1, w - 1] * 2)
        points = labels = None
        if prompts.points is not None and not self.backbone.box_trained:
            points, labels = prompts.points - [r0, c0], prompts.point_labels
        dense = None if prompts.mask_logits is None else prompts.mask_logits[:, r0:r0 + h, c0:c0 + w]
        local = PromptBatch(None if boxes is None else boxes.astype(np.float32),
                            None if points is None else points.astype(np.float32), labels, dense)
        embeddings = self._embeddings_on_device(volume_id, view, slices)
        masks, _ = self._masks(self.cache_key(volume_id, view), slices, embeddings, local, view.slice_shape)
        whole = np.zeros((len(slices), *view.focused(None).slice_shape), dtype=bool)
        whole[:, r0:r0 + h, c0:c0 + w] = masks.cpu().numpy()
        return whole

    def decoder_changed(self) -> None:
        """Forget remembered masks: training calls it after each update of the decoder weights it tunes in place
        (serving switches whole states with :meth:`serve` instead)."""
        self.memo = MaskMemo()

    def _decode(self, key: str, embeddings, consensus: Consensus, saliency, slices: list[int], view: VolumeView
                ) -> tuple[torch.Tensor, np.ndarray]:
        """Masks of ``slices`` of the view (and its region) from their consensus prompts (points only for
        point-trained backbones), and the IoU the decoder predicts for each; ``embeddings`` and ``saliency`` hold
        the same slices."""
        prompts = [consensus.prompts[s] for s in slices]
        shift = np.array(view.origin, dtype=np.float32)
        boxes = np.array([p.box for p in prompts], dtype=np.float32) - np.tile(shift, 2)
        points = labels = dense = None
        if not self.backbone.box_trained:
            points, labels = _pad_points(prompts)
            points = points - shift
        if self.backbone.uses_mask_prompt:
            dense = torch.logit(saliency.to(self.backbone.device), eps=1e-4)
        return self._masks(key, list(slices), embeddings, PromptBatch(boxes, points, labels, dense), view.slice_shape)

    def _masks(self, key: str, slices: list[int], embeddings: torch.Tensor, prompts: PromptBatch, slice_shape
               ) -> tuple[torch.Tensor, np.ndarray]:
        """Bool masks on the backbone's device and their predicted IoUs, decoding in chunks only what the memo does
        not hold."""
        def decode(rows: list[int], subset: PromptBatch) -> tuple[torch.Tensor, np.ndarray]:
            parts = []
            for start in range(0, len(rows), self.decode_chunk):
                part = slice(start, start + self.decode_chunk)
                parts.append(self.backbone.decode_scored(embeddings[rows[part]], subset.rows(part), slice_shape,
                                                         binary=True))
            return torch.cat([m for m, _ in parts]), torch.cat([q for _, q in parts]).cpu().numpy()

        return self.memo.masks(key, slices, prompts, slice_shape, decode)

    def _assemble(self, masks: torch.Tensor, saliency: torch.Tensor, consensus: Consensus, view: VolumeView, first: int,
                  roi) -> np.ndarray:
        """Slab of slice masks (on the backbone's device) -> full-size volume on the host; ends where saliency fades
        and components without a prompt are dropped. Works on the in-plane box that holds the masks and the
        prompts, where the masks are; the result is copied to the host once."""
        device = masks.device
        seeds = np.array([(s - first, r, c) for s, p in consensus.prompts.items() for r, c in p.positives],
                         dtype=float).reshape(-1, 3).round().astype(int) - [0, *view.origin]
        # a seed beyond the region holds on to its edge
        seeds = torch.as_tensor(np.clip(seeds, 0, np.array(masks.shape) - 1), device=device)
        rows, cols = bounding_box(masks, seeds, axes=(1, 2)) or (slice(0, 0), slice(0, 0))
        masks = masks[:, rows, cols]
        saliency = saliency[:, rows, cols].to(device)
        support = (saliency * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp_min(1)  # 0 for empty masks
        masks = trim_unanchored_ends(masks, first, consensus.anchored_range, support)
        if roi is not None:
            (r0, r1), (c0, c1) = (np.subtract(roi[a], o) for a, o in zip(view.in_plane, view.origin))
            inside = torch.zeros(masks.shape[1:], dtype=torch.bool, device=device)
            inside[max(r0 - rows.start, 0):max(r1 + 1 - rows.start, 0),
                   max(c0 - cols.start, 0):max(c1 + 1 - cols.start, 0)] = True
            masks &= inside
        masks = keep_prompted_components(masks, seeds - torch.tensor([0, rows.start, cols.start], device=device))
        volume = np.zeros(view.volume.shape, dtype=bool)
        target = [slice(None)] * 3
        target[view.axis] = slice(first, first + masks.shape[0])
        for a, o, span in zip(view.in_plane, view.origin, (rows, cols)):
            target[a] = slice(span.start + o, span.stop + o)
        volume[tuple(target)] = np.moveaxis(masks.cpu().numpy(), 0, view.axis)
        return volume


def _unpicked(record: dict, picked: Sequence[int], kept: Sequence[int], axis: int) -> dict:
    """A consensus record of a stack of ``picked`` slices, from clicks ``kept`` of the request, in the volume's
    slice and click indices."""
    def entry(item: dict) -> dict:
        out = dict(item)
        if "click" in out:
            out["click"] = kept[out["click"]]
        for name in ("ijk", "moved_to"):
            if name in out:
                out[name] = [picked[v] if a == axis else v for a, v in enumerate(out[name])]
        return out

    return {status: [entry(item) for item in items] for status, items in record.items()}


def _pad_points(prompts) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative points of each slice, padded to the same count (label -1)."""
    count = max(len(p.positives) + len(p.negatives) for p in prompts)
    points = np.zeros((len(prompts), count, 2), dtype=np.float32)
    labels = -np.ones((len(prompts), count), dtype=np.int64)
    for n, p in enumerate(prompts):
        pts = list(p.positives) + list(p.negatives)
        points[n, : len(pts)] = pts
        labels[n, : len(pts)] = [1] * len(p.positives) + [0] * len(p.negatives)
    return points, labels
