"""The SPD method on one volume: weak clicks -> consensus prompts -> decoded slices -> one 3D mask.

``prompts`` parses clicks and picks the slice axis; ``saliency`` and ``saliency_head`` say where a
structure's appearance is (from the clicks, or learned per label); ``distillation`` (CPD) validates
each click against its neighbours and the saliency; ``box_probing`` asks the decoder which box
fits; ``assembly`` keeps the 3D components the prompts support. ``pipeline`` runs them in order on
the embeddings a backbone (``lib.spd.runtime``) makes, with what training learned as one
``TrainedState``; on a cold volume it may answer first with a ``draft`` from the clicked slices alone.
``interaction`` keeps a session per structure being annotated: later clicks
correct its result in 3D (``corrections``); a box alone is a prompt too (``box_prompt``).
"""

from .intensity import IntensityWindow, choose_window
from .interaction import Interactions
from .pipeline import Segmentation, SPDPipeline, VolumeView, segment_range
from .prompts import Click, PromptError, choose_slice_axis, parse_clicks, parse_roi, training_axis
from .saliency_head import SaliencyHead
from .size_prior import SizePrior, learn_size_prior
from .trained_state import TrainedState

__all__ = ["Click", "IntensityWindow", "Interactions", "PromptError", "SPDPipeline", "SaliencyHead", "Segmentation", "SizePrior",
           "TrainedState", "VolumeView", "choose_slice_axis", "choose_window", "learn_size_prior", "parse_clicks",
           "parse_roi", "segment_range", "training_axis"]
