"""Active learning: uncertainty of the trained saliency head, cached per model version, ranks unlabelled volumes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk
import torch

from lib.activelearning.uncertainty import (
    SCORE_KEY,
    SPDUncertainty,
    SPDUncertaintyScoring,
    saliency_uncertainty,
    sample_pairs,
)
from lib.spd.method import SaliencyHead, TrainedState


def blob(shift: int = 0, level: float = 0.99) -> torch.Tensor:
    p = torch.full((16, 16), 1e-4)
    p[4:10, 4 + shift:10 + shift] = level
    return p


def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a, b])[None, :, None]  # (1 pair, 2 slices, 1 label, g, g)


def test_confident_consistent_saliency_is_least_uncertain():
    steady = saliency_uncertainty(pair(blob(), blob()))
    flicker = saliency_uncertainty(pair(blob(), blob(5)))
    unsure = saliency_uncertainty(pair(blob(level=0.5), blob(level=0.5)))
    assert steady < flicker and steady < unsure


def test_pairs_lie_in_the_middle_third():
    starts = sample_pairs(90, 4)
    assert len(starts) == 4 and 30 <= min(starts) and max(starts) + 1 <= 60


class FakeDatastore:
    def __init__(self, images: dict[str, str], labelled=()):
        self.images, self.labelled, self.info = images, set(labelled), {i: {} for i in images}

    def get_unlabeled_images(self, tag=None, labels=None):
        return [i for i in self.images if i not in self.labelled]

    def get_image_info(self, image):
        return dict(self.info[image])

    def get_image_uri(self, image):
        return self.images[image]

    def update_image_info(self, image, info):
        self.info[image].update(info)


def test_strategy_ranks_by_cached_score_and_falls_back_to_random():
    store = FakeDatastore({"a": "", "b": "", "c": ""}, labelled={"c"})
    assert SPDUncertainty()({}, store)["id"] in ("a", "b")
    store.update_image_info("a", {SCORE_KEY: {"score": 0.2, "model_version": 1}})
    store.update_image_info("b", {SCORE_KEY: {"score": 0.7, "model_version": 1}})
    assert SPDUncertainty()({}, store) == {"id": "b", SCORE_KEY: 0.7}


def test_scoring_caches_scores_per_model_version(tmp_path):
    paths = {}
    for name in ("a", "b"):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((12, 20, 20)).astype(np.float32)),
                        paths[name])
    datastore = FakeDatastore(paths, labelled={"b"})
    head = SaliencyHead(["x"], in_channels=8, width=8)
    embedded = []

    def embed(volume_id, view, slices):
        embedded.append(list(slices))
        return torch.randn(len(slices), 8, 16, 16)

    version = {"v": 1}
    pipeline = SimpleNamespace(state=TrainedState(saliency_heads={"x": head.for_label("x")}), embed=embed)
    served = SimpleNamespace(refresh=lambda: version["v"], store=SimpleNamespace(current=lambda: version["v"]))
    scoring = SPDUncertaintyScoring(pipeline, served, pairs=2)
    assert scoring.pending(datastore) == ["a"]
    scores = scoring({}, datastore)
    assert list(scores) == ["a"] and datastore.info["a"][SCORE_KEY]["model_version"] == 1
    assert embedded and all(4 <= s <= 8 for s in embedded[0]), "slices from the middle third along the coarsest axis"
    assert scoring.pending(datastore) == [] and scoring({}, datastore) == {}, "cached for the same model"
    version["v"] = 2
    assert scoring.pending(datastore) == ["a"], "refreshed after training"
