"""What training produced and a pipeline serves, as one value: switched as a whole, never edited in place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from torch import nn

from .saliency import SaliencyModel
from .size_prior import SizePrior


@dataclass(frozen=True)
class TrainedState:
    """The learned parts of SPD; the untrained model is ``TrainedState()``.

    Attributes:
        saliency_heads: trained saliency per label name (labels without one use appearance saliency).
        size_priors: probe sizes learned per label name from its saved labels.
        decoder: the mask decoder to decode with; None: the backbone's own weights.
        adapters: LoRA adapters of the image encoder (``encoder_lora.state``); None: the base encoder.
        version: the published checkpoint this state was loaded from (None: not a published one).
    """

    saliency_heads: Mapping[str, SaliencyModel] = field(default_factory=dict)
    size_priors: Mapping[str, SizePrior] = field(default_factory=dict)
    decoder: nn.Module | None = None
    adapters: dict | None = None
    version: int | None = None

    def __post_init__(self):
        for name in ("saliency_heads", "size_priors"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def replace(self, **changes: Any) -> "TrainedState":
        """A new state with ``changes`` (field -> value)."""
        return dataclasses.replace(self, **changes)
