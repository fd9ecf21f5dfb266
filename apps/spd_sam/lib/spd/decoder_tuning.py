"""Decoding with gradients, for fine-tuning a backbone's mask decoder on box prompts.

``Backbone.decode`` runs under inference mode, one slice at a time on a window of the embedding
around each box. Here a group of slices is decoded in one call on the union of their windows
(same crop margin, so the decoder sees the context it sees when serving) and the logits are
mapped back to slice pixels with differentiable resizing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import OUTSIDE_LOGIT, Backbone, Geometry, SlicePrompts
from .batched_decoding import decode_prompted


class DifferentiableDecoder(nn.Module):
    """Box prompts + embeddings -> slice logits with gradients through the backbone's mask decoder.

    The decoder is this module's only submodule (the prompt encoder stays frozen outside it), so
    wrapping the module in DistributedDataParallel synchronises exactly the tuned weights. One
    forward call decodes several groups of slices, each on its own window, so that a training
    step is one forward and one backward however many groups it has.

    Args:
        backbone: a box-trained backbone whose decoder is being tuned.
    """

    def __init__(self, backbone: Backbone):
        assert backbone.box_trained, f"decoder tuning uses box prompts only; {backbone.name} is point-trained"
        super().__init__()
        self.backbone = backbone
        self.mask_decoder = backbone.model.mask_decoder
        with torch.no_grad():
            self.register_buffer("dense_pe", backbone.model.prompt_encoder.get_dense_pe().detach().clone(),
                                 persistent=False)

    def window(self, boxes: np.ndarray, slice_shape: tuple[int, int]) -> tuple[slice, slice]:
        """The union of the per-slice decoding windows that serving would use for these boxes."""
        geometry = Geometry(slice_shape, self.backbone.image_size)
        grid = self.dense_pe.shape[-1]
        prompts = SlicePrompts(boxes=boxes)
        windows = [self.backbone._window(prompts, i, geometry, grid) for i in range(len(boxes))]
        return (slice(min(r.start for r, _ in windows), max(r.stop for r, _ in windows)),
                slice(min(c.start for _, c in windows), max(c.stop for _, c in windows)))

    def forward(self, groups: Sequence[tuple[torch.Tensor, np.ndarray, tuple[int, int]]]) -> list[torch.Tensor]:
        """(N, H, W) logits at slice resolution for each group of ``(embeddings, boxes, slice_shape)``.

        Args:
            groups: per group, (N, C, g, g) slice embeddings (any float dtype; the encoder is frozen),
                (N, 4) boxes (row0, col0, row1, col1) in slice pixels, one per slice, and (H, W).
        """
        return [self._decode(*group) for group in groups]

    def _decode(self, embeddings: torch.Tensor, boxes: np.ndarray, slice_shape: tuple[int, int]) -> torch.Tensor:
        model, device = self.backbone.model, self.backbone.device
        geometry = Geometry(tuple(int(v) for v in slice_shape), self.backbone.image_size)
        boxes = np.asarray(boxes, dtype=np.float32)
        model_boxes, _ = self.backbone.model_prompts(SlicePrompts(boxes=boxes), slice(None), geometry)
        with torch.no_grad():
            sparse, dense = model.prompt_encoder(points=None, boxes=model_boxes, masks=None)
        rows, cols = self.window(boxes, geometry.slice_shape)
        low_res = decode_prompted(self.mask_decoder, embeddings[..., rows, cols].to(device, torch.float32),
                                  self.dense_pe[..., rows, cols], sparse, dense[..., rows, cols])
        grid = self.dense_pe.shape[-1]
        up = low_res.shape[-1] // (cols.stop - cols.start)
        canvas = F.pad(low_res, (up * cols.start, up * (grid - cols.stop), up * rows.start, up * (grid - rows.stop)),
                       value=OUTSIDE_LOGIT)
        if canvas.shape[-1] != self.backbone.image_size:
            canvas = F.interpolate(canvas, size=(self.backbone.image_size,) * 2, mode="bilinear", align_corners=False)
        new_h, new_w = geometry.resized
        logits = F.interpolate(canvas[..., :new_h, :new_w], size=geometry.slice_shape, mode="bilinear",
                               align_corners=False)
        return logits[:, 0]
