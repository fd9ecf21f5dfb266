"""The model runtime: SAM-family backbones (weights, encoder runners, ONNX, SDPA attention, LoRA) and decoding.

A ``Backbone`` embeds slices and decodes prompts (``PromptBatch``: boxes, points, dense masks) into
masks; nothing here knows about clicks, labels or servers.
"""

from . import encoder_lora
from .backbones import (BACKBONE_NAMES, LITE_MEDSAM, Backbone, BackboneError, Geometry, PromptBatch, assemble_backbone,
                        load_backbone)
from .encoder_runner import EncoderRunner, EncoderSettings

__all__ = ["BACKBONE_NAMES", "LITE_MEDSAM", "Backbone", "BackboneError", "EncoderRunner", "EncoderSettings", "Geometry",
           "PromptBatch", "assemble_backbone", "encoder_lora", "load_backbone"]
