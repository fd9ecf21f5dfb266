"""SAM ViT attention through ``torch.nn.functional.scaled_dot_product_attention``.

SAM's stock attention block materialises the full (tokens x tokens) score matrix in the input
dtype and adds its decomposed relative-position bias to it. Here the same bias is built once per
call and handed to SDPA as an additive ``attn_mask``, so PyTorch's fused kernels do the softmax
and the weighted sum. The replacement keeps the stock block's parameters (and so its state-dict
keys): loading, training and saving a model are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SDPAAttention(nn.Module):
    """Drop-in for ``segment_anything.modeling.image_encoder.Attention``, sharing its parameters."""

    def __init__(self, stock: nn.Module):
        super().__init__()
        self.num_heads = stock.num_heads
        self.qkv = stock.qkv
        self.proj = stock.proj
        self.use_rel_pos = stock.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = stock.rel_pos_h
            self.rel_pos_w = stock.rel_pos_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (batch, heads, tokens, head_dim)
        bias = self._relative_position_bias(q, height, width) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))

    def _relative_position_bias(self, q: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(batch, heads, tokens, tokens) bias: query . rel_pos along rows plus along columns."""
        from segment_anything.modeling.image_encoder import get_rel_pos

        rel_h = get_rel_pos(height, height, self.rel_pos_h).to(q.dtype)  # (height, height, head_dim)
        rel_w = get_rel_pos(width, width, self.rel_pos_w).to(q.dtype)
        grid_q = q.reshape(*q.shape[:2], height, width, -1)
        along_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h)
        along_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w)
        bias = along_h[..., :, None] + along_w[..., None, :]  # (b, n, h, w, key_h, key_w)
        return bias.reshape(*q.shape[:2], height * width, height * width)


def use_sdpa_attention(image_encoder: nn.Module) -> int:
    """Swap every stock SAM attention block of a ViT image encoder for :class:`SDPAAttention`.

    Returns the number of blocks swapped (0 for encoders without SAM's attention, e.g. TinyViT).
    """
    from segment_anything.modeling.image_encoder import Attention

    swapped = 0
    for block in getattr(image_encoder, "blocks", []):
        if isinstance(getattr(block, "attn", None), Attention):
            block.attn = SDPAAttention(block.attn)
            swapped += 1
    return swapped
