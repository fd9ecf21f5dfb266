"""Decoding with gradients, for fine-tuning a backbone's mask decoder on box prompts.

The decoding is serving's own (``Backbone.decode_logits``); what this module adds is the unit that
DistributedDataParallel wraps: the mask decoder as its only submodule, and several groups of
slices per forward call, each decoded on the union of the windows serving would use for its boxes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, Geometry, PromptBatch


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

    def forward(self, groups: Sequence[tuple[torch.Tensor, np.ndarray, tuple[int, int]]]) -> list[torch.Tensor]:
        """(N, H, W) logits at slice resolution for each group of ``(embeddings, boxes, slice_shape)``.

        Args:
            groups: per group, (N, C, g, g) slice embeddings (any float dtype; the encoder is frozen),
                (N, 4) boxes (row0, col0, row1, col1) in slice pixels, one per slice, and (H, W).
        """
        logits = []
        for embeddings, boxes, slice_shape in groups:
            geometry = Geometry(tuple(int(v) for v in slice_shape), self.backbone.image_size)
            prompts = PromptBatch(boxes=np.asarray(boxes, dtype=np.float32))
            window = self.backbone.window(prompts, geometry, embeddings.shape[-1])
            logits.append(self.backbone.decode_logits(embeddings.to(self.backbone.device, torch.float32), prompts,
                                                      geometry, window)[0])
        return logits
