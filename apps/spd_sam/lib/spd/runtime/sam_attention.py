"""SAM ViT attention through ``torch.nn.functional.scaled_dot_product_attention``.

SAM's stock attention block materialises the full (tokens x tokens) score matrix in the input
dtype and adds its decomposed relative-position bias to it. On the CPU the same bias is built once
per call and handed to SDPA as an additive ``attn_mask``, so PyTorch's fused kernels do the
softmax and the weighted sum. A mask keeps SDPA off its flash kernel, so on a GPU the bias is
folded into the queries and keys instead: the bias of query i and key j is query i's row term at
key j's row plus its column term at key j's column, which is the dot product of those terms with
one-hot vectors of key j's row and column. Appended to the queries (divided by the softmax scale)
and to the keys, they give exactly the biased scores, with no mask. The replacement keeps the
stock block's parameters (and so its state-dict keys): loading, training and saving a model are
unchanged.
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
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        elif q.is_cuda:
            out = self.folded_attention(q, k, v, height, width)
        else:
            out = self.masked_attention(q, k, v, height, width)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))

    def masked_attention(self, q, k, v, height: int, width: int) -> torch.Tensor:
        """The relative-position bias as an additive (tokens x tokens) mask."""
        along_h, along_w = self._relative_terms(q, height, width)
        bias = along_h[..., :, None] + along_w[..., None, :]  # (b, n, h, w, key_h, key_w)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(*q.shape[:3], q.shape[2]))

    def folded_attention(self, q, k, v, height: int, width: int) -> torch.Tensor:
        """The relative-position bias folded into queries and keys (see the module's docstring); no mask, so SDPA
        may take its flash kernel. Head dimensions are zero-padded to a multiple of 8, values to that of the keys."""
        scale = q.shape[-1] ** -0.5
        along_h, along_w = self._relative_terms(q, height, width)
        tokens = q.shape[2]
        key_rows = torch.eye(height, dtype=q.dtype, device=q.device).repeat_interleave(width, dim=0)
        key_cols = torch.eye(width, dtype=q.dtype, device=q.device).repeat(height, 1)
        extra = torch.cat([along_h, along_w], dim=-1).reshape(*q.shape[:2], tokens, height + width) / scale
        keys = torch.cat([key_rows, key_cols], dim=-1).expand(*k.shape[:2], tokens, height + width)
        dim = -(-(q.shape[-1] + height + width) // 8) * 8
        q = F.pad(torch.cat([q, extra], dim=-1), (0, dim - q.shape[-1] - height - width))
        k = F.pad(torch.cat([k, keys], dim=-1), (0, dim - k.shape[-1] - height - width))
        head_dim = v.shape[-1]
        out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, dim - head_dim)), scale=scale)
        return out[..., :head_dim]

    def _relative_terms(self, q: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, heads, height, width, height) and (..., width): each query's bias term per key row and per key
        column (query . relative-position embedding)."""
        from segment_anything.modeling.image_encoder import get_rel_pos

        rel_h = get_rel_pos(height, height, self.rel_pos_h).to(q.dtype)  # (height, height, head_dim)
        rel_w = get_rel_pos(width, width, self.rel_pos_w).to(q.dtype)
        grid_q = q.reshape(*q.shape[:2], height, width, -1)
        return (torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h), torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w))


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
