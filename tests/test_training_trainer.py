"""The trainer task without a server: datastore in, versioned checkpoint out, served model untouched meanwhile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib.spd.backbones import load_backbone
from lib.spd.checkpoints import CheckpointStore
from lib.spd.embedding_cache import EmbeddingCache
from lib.spd.pipeline import SPDPipeline
from lib.spd.served_model import ServedModel
from lib.trainers.spd_trainer import SPDTrainer
from make_cohort import make_cohort, write_cohort

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "spd_sam"
LABELS = {"right_caudate": 2, "right_putamen": 4}


class FolderDatastore:
    """The four datastore calls the trainer makes, over a folder of images and a folder of final labels."""

    def __init__(self, images, labels, names):
        self.images, self.labels, self.names = images, labels, names

    def get_labeled_images(self, tag=None, labels=None):
        return list(self.names)

    def get_label_by_image_id(self, image_id, tag):
        return image_id

    def get_image_uri(self, image_id):
        return str(self.images / f"{image_id}.nii.gz")

    def get_label_uri(self, label_id, tag):
        return str(self.labels / f"{label_id}.nii.gz")


@pytest.fixture(scope="module")
def datastore(tmp_path_factory):
    """Two small synthetic volumes (Colin27 + AAL variations) with final labels."""
    work = tmp_path_factory.mktemp("trainer")
    subjects = make_cohort(2, seed=1, labels=list(LABELS), crop_margin_mm=(25, 25, 2), slice_mm=4.0)
    write_cohort(subjects, work / "images", label_dir=work / "labels")
    return FolderDatastore(work / "images", work / "labels", [s.name for s in subjects]), work


def test_a_round_publishes_a_version_and_leaves_the_served_model_alone(datastore, tmp_path):
    store_, work = datastore
    backbone = load_backbone(cache_dir=str(APP_DIR / "model" / "runtime"))  # the app's ONNX encoder export
    pipeline = SPDPipeline(backbone, EmbeddingCache(1 << 30, work / "cache"))
    store = CheckpointStore(tmp_path / "trained")
    served = ServedModel(store, pipeline)
    decoder = backbone.model.mask_decoder
    before = {k: v.clone() for k, v in decoder.state_dict().items()}

    result = SPDTrainer(pipeline, LABELS, store)({"max_epochs": 1, "head_epochs": 2, "max_minutes": 2}, store_)

    assert result["version"] == 1 and store.current() == 1 and set(result["labels"]) <= set(LABELS)
    assert backbone.model.mask_decoder is decoder and pipeline.saliency_heads == {}, "served model until refresh"
    assert all(torch.equal(before[k], v) for k, v in decoder.state_dict().items())
    meta = store.metadata()
    assert meta["train_volumes"] and meta["val_volumes"] and meta["history"][0]["stage"] == "saliency"
    assert store.path(1, ".png").stat().st_size > 1000
    assert served.refresh() == 1 and set(pipeline.saliency_heads) == set(result["labels"])
