"""One mask-decoder call for many slices, each with its own embedding and prompts.

SAM's ``MaskDecoder.forward`` decodes several prompts against one image (it repeats the image
embedding per prompt). Here every slice brings its own embedding, so the decoder's parts are
driven directly with slice i's embedding paired with slice i's prompt tokens. Only the first
mask token is used: it is the one SAM returns with ``multimask_output=False``, with the IoU that the
decoder's own head predicts for it.
"""

from __future__ import annotations

import torch
from torch import nn


def decode_prompted(decoder: nn.Module, embeddings: torch.Tensor, dense_pe: torch.Tensor, sparse: torch.Tensor,
                    dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution mask logits (N, 1, 4h, 4w) and predicted IoUs (N,) from N slice embeddings (N, C, h, w) and
    their encoded prompts (sparse (N, T, C), dense (N, C, h, w)); ``dense_pe`` (1, C, h, w) covers the same grid
    cells."""
    count = len(embeddings)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]).expand(count, -1, -1)
    tokens = torch.cat([output_tokens, sparse], dim=1)
    image = embeddings.to(dense.dtype) + dense
    channels, height, width = image.shape[1:]
    hidden, image = decoder.transformer(image, dense_pe.expand(count, -1, -1, -1), tokens)
    upscaled = decoder.output_upscaling(image.transpose(1, 2).reshape(count, channels, height, width))
    weights = decoder.output_hypernetworks_mlps[0](hidden[:, 1])  # first mask token
    predicted_iou = decoder.iou_prediction_head(hidden[:, 0])[:, 0]
    return torch.einsum("nc,nchw->nhw", weights, upscaled)[:, None], predicted_iou
