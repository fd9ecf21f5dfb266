"""Small randomly initialised SAM networks for the tests of the fast paths (same code as ViT-B, fewer weights)."""

from __future__ import annotations

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer


def tiny_sam(image_size: int = 128, seed: int = 0) -> Sam:
    """A SAM with a 4-block ViT (two global-attention blocks with relative positions) and random weights."""
    torch.manual_seed(seed)
    grid = image_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=image_size, patch_size=16, embed_dim=96, depth=4, num_heads=4,
                                      global_attn_indexes=(1, 3), window_size=4, use_rel_pos=True, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=256,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=512, num_heads=8)),
    )
    for name, parameter in sam.named_parameters():
        if "rel_pos" in name:  # zero-initialised in SAM; random here so that the bias is exercised
            torch.nn.init.normal_(parameter, std=0.5)
    return sam.eval()
