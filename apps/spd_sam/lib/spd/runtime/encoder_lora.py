"""LoRA adapters on the attention projections of a SAM ViT image encoder.

Every block's ``attn.qkv`` linear layer becomes ``base(x) + (alpha / rank) * up(down(x))`` with
the base frozen and ``up`` starting at zero, so a freshly attached adapter changes nothing. The
adapters stay separate modules while serving too (their cost is small next to the projection),
so removing them gives back the base encoder exactly. An adapter state is a plain dict of
tensors and numbers, loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        weight = base.weight
        self.down = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down), self.up) * self.scale


def _projected(encoder: nn.Module) -> list[nn.Module]:
    """The attention modules of the encoder's blocks that have a ``qkv`` projection (none: not a SAM ViT)."""
    attentions = [getattr(block, "attn", None) for block in getattr(encoder, "blocks", None) or []]
    return [a for a in attentions if isinstance(getattr(a, "qkv", None), (nn.Linear, LoRALinear))]


def _base(attention: nn.Module) -> nn.Linear:
    """The attention's own ``qkv`` projection, under its adapter if it has one."""
    return attention.qkv.base if isinstance(attention.qkv, LoRALinear) else attention.qkv


def _attentions(encoder: nn.Module) -> list[nn.Module]:
    """The attention modules of a SAM ViT encoder, each with a ``qkv`` projection."""
    if not adapters_fit(encoder):
        raise ValueError(f"LoRA adapters need a SAM ViT image encoder (blocks with attn.qkv); "
                         f"got {type(encoder).__name__}")
    return _projected(encoder)


def adapters_fit(encoder: nn.Module) -> bool:
    """Whether adapters can be put on ``encoder``: every block has an attention ``qkv`` projection."""
    blocks = getattr(encoder, "blocks", None) or []
    return bool(blocks) and len(_projected(encoder)) == len(blocks)


def adapters(encoder: nn.Module) -> list[LoRALinear]:
    """The adapters attached to ``encoder`` (empty when none are)."""
    return [a.qkv for a in _projected(encoder) if isinstance(a.qkv, LoRALinear)]


def attach(encoder: nn.Module, rank: int, alpha: float) -> list[LoRALinear]:
    """Put fresh adapters on every block (replacing any already there); the base weights are frozen."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    added = []
    for attention in _attentions(encoder):
        base = _base(attention)
        base.requires_grad_(False)
        attention.qkv = LoRALinear(base, rank, alpha)
        added.append(attention.qkv)
    return added


def detach(encoder: nn.Module) -> None:
    """Remove the adapters, giving back the base projections themselves."""
    for attention in _projected(encoder):
        if isinstance(attention.qkv, LoRALinear):
            attention.qkv = attention.qkv.base


def state(encoder: nn.Module) -> dict | None:
    """The adapters' rank, alpha and weights (on the CPU), or None without adapters."""
    found = adapters(encoder)
    if not found:
        return None
    return {"rank": found[0].rank, "alpha": found[0].alpha,
            "down": [a.down.detach().cpu().clone() for a in found], "up": [a.up.detach().cpu().clone() for a in found]}


def check(encoder: nn.Module, saved: dict) -> None:
    """Raise ValueError unless ``saved`` (from :func:`state`) fits ``encoder``."""
    attentions = _attentions(encoder)
    try:
        rank, down, up = int(saved["rank"]), list(saved["down"]), list(saved["up"])
        float(saved["alpha"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"malformed LoRA adapter state: {error}") from None
    if len(down) != len(attentions) or len(up) != len(attentions):
        raise ValueError(f"LoRA adapters for {len(down)} blocks, the encoder has {len(attentions)}")
    for n, (attention, d, u) in enumerate(zip(attentions, down, up)):
        base = _base(attention)
        expected = ((rank, base.in_features), (base.out_features, rank))
        if (tuple(d.shape), tuple(u.shape)) != expected:
            raise ValueError(f"LoRA adapter of block {n} has shapes {tuple(d.shape)}, {tuple(u.shape)}; "
                             f"the encoder needs {expected[0]}, {expected[1]}")


def load(encoder: nn.Module, saved: dict | None) -> None:
    """Install ``saved`` adapters (checked first), or remove all adapters when ``saved`` is None."""
    if saved is None:
        detach(encoder)
        return
    check(encoder, saved)
    with torch.no_grad():
        for adapter, down, up in zip(attach(encoder, int(saved["rank"]), float(saved["alpha"])), saved["down"], saved["up"]):
            adapter.down.copy_(down)
            adapter.up.copy_(up)


def current_digest(encoder: nn.Module) -> str:
    """The :func:`digest` of the adapters on ``encoder`` now ("" without adapters)."""
    return digest(state(encoder))


def digest(saved: dict | None) -> str:
    """A short name of an adapter state ("" for none): it keys the embeddings the adapted encoder makes."""
    if saved is None:
        return ""
    hasher = hashlib.sha256(f"{saved['rank']}:{saved['alpha']}".encode())
    for tensor in (*saved["down"], *saved["up"]):
        hasher.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return "lora" + hasher.hexdigest()[:12]
