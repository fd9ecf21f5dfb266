"""Which volume to label next: the one the trained saliency head is least sure about.

A volume's score averages, over the trained labels and a few pairs of adjacent slices through its
middle third (along the axis the infer side embeds in the background, so the embeddings are
usually cached), two terms of the saliency head's probabilities ``p`` on the embedding grid:

- entropy: the binary entropy of ``p``, per unit of predicted structure;
- adjacent-slice disagreement: ``sum |p_s - p_s+1| / sum max(p_s, p_s+1)``, flicker that real
  anatomy does not have between neighbouring slices.

Scores are computed by a MONAI Label scoring method (in the background, after training) and
cached in the datastore's image info with the model version they belong to; the strategy ranks
unlabelled volumes by the cached scores and falls back to a random pick while none is scored.
"""

from __future__ import annotations

import logging
import random
from typing import Sequence

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from lib.spd.method import SaliencyHead, SPDPipeline, VolumeView, choose_window, training_axis
from lib.spd.serving import ModelReloader
from lib.volume_io import VolumeReader

logger = logging.getLogger(__name__)

SCORE_KEY = "spd_uncertainty"


def saliency_uncertainty(probs: torch.Tensor) -> float:
    """Uncertainty of (P, 2, L, g, g) probabilities of P pairs of adjacent slices and L labels."""
    p = probs.clamp(1e-6, 1 - 1e-6)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()) / np.log(2.0)
    per_structure = entropy.sum(dim=(-2, -1)) / p.sum(dim=(-2, -1)).clamp_min(1.0)
    first, second = p[:, 0], p[:, 1]
    disagreement = (first - second).abs().sum(dim=(-2, -1)) / torch.maximum(first, second).sum(dim=(-2, -1)).clamp_min(1.0)
    return float(per_structure.mean() + disagreement.mean())


def sample_pairs(depth: int, pairs: int) -> list[int]:
    """First slices of ``pairs`` adjacent pairs spread over the middle third of ``depth`` slices."""
    low, high = depth // 3, max(depth // 3, 2 * depth // 3 - 1)
    return sorted({int(s) for s in np.linspace(low, high, pairs).round()})


def _score(info: dict) -> dict | None:
    score = info.get(SCORE_KEY)
    return score if isinstance(score, dict) and "score" in score else None


class SPDUncertaintyScoring(ScoringMethod):
    """Scores unlabelled volumes with the served saliency head; skips those scored by the same model version.

    Args:
        pipeline: the app's pipeline (backbone, embedding cache, saliency heads).
        served: the published model, refreshed before scoring.
        modality: intensity window choice, as for inference.
        pairs: pairs of adjacent slices per volume.
    """

    def __init__(self, pipeline: SPDPipeline, served: ModelReloader, modality: str = "auto", pairs: int = 4):
        super().__init__("Saliency entropy and adjacent-slice disagreement of the trained SPD saliency head")
        self.pipeline = pipeline
        self.served = served
        self.modality = modality
        self.pairs = pairs

    def pending(self, datastore: Datastore) -> list[str]:
        """Unlabelled images without a score from the published model version."""
        version = self.served.store.current()
        if version is None:
            return []
        return [image for image in datastore.get_unlabeled_images(DefaultLabelTag.FINAL)
                if (_score(datastore.get_image_info(image)) or {}).get("model_version") != version]

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        version = self.served.refresh()
        heads = {id(s.head): s.head for s in self.pipeline.state.saliency_heads.values()}.values()
        if version is None or not heads:
            return {}
        reader, scores = VolumeReader(keep=1), {}
        for image in self.pending(datastore):
            volume = reader.read(datastore.get_image_uri(image))
            view = VolumeView(volume.array, training_axis(volume.spacing, volume.array.shape), choose_window(volume.array, self.modality))
            scores[image] = float(np.mean([self.score_volume(h, volume.volume_id, view) for h in heads]))
            datastore.update_image_info(image, {SCORE_KEY: {"score": scores[image], "model_version": version}})
            logger.info("%s: %s %.4f (model v%04d)", image, SCORE_KEY, scores[image], version)
        return scores

    def score_volume(self, head: SaliencyHead, volume_id: str, view: VolumeView) -> float:
        """Uncertainty of one head's labels on pairs of adjacent slices of a volume (embedded through the cache)."""
        starts = sample_pairs(view.depth, self.pairs)
        slices = sorted({s + k for s in starts for k in (0, 1) if s + k < view.depth})
        embeddings = self.pipeline.embed(volume_id, view, slices)
        with torch.inference_mode():
            probs = torch.sigmoid(head.eval()(embeddings))
        at = {s: n for n, s in enumerate(slices)}
        pairs = [(at[s], at[s + 1]) for s in starts if s + 1 in at]
        return saliency_uncertainty(torch.stack([probs[[a, b]] for a, b in pairs]))


class SPDUncertainty(Strategy):
    """Proposes the unlabelled volume with the highest cached uncertainty (random while none is scored)."""

    def __init__(self):
        super().__init__("Most uncertain unlabelled volume for the trained SPD saliency head")

    def __call__(self, request: dict, datastore: Datastore) -> dict | None:
        images: Sequence[str] = datastore.get_unlabeled_images(DefaultLabelTag.FINAL)
        if not images:
            return None
        scored = {i: s["score"] for i in images if (s := _score(datastore.get_image_info(i)))}
        if not scored:
            return {"id": random.choice(list(images))}
        image = max(scored, key=scored.get)
        return {"id": image, SCORE_KEY: scored[image]}
