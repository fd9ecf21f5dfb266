"""The trainer task without a server: datastore in, versioned checkpoint out, served model untouched meanwhile."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from labelled_cohort import LABELS

from lib.configs.spd_sam import DEFAULTS as CONFIG_DEFAULTS
from lib.configs.spd_sam import build_pipeline
from lib.spd.method import SaliencyHead, SPDPipeline, TrainedState
from lib.spd.runtime import load_backbone
from lib.spd.serving import CheckpointStore, EmbeddingCache, ModelReloader
from lib.spd.training import TIME_BUDGET, TrainConfig, TrainingResult
from lib.trainers.publishing import publish_round
from lib.trainers.spd_trainer import SPDTrainer, TrainRequestError

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "spd_sam"
def test_a_round_publishes_a_version_and_leaves_the_served_model_alone(cohort_datastore, tmp_path):
    store_, work = cohort_datastore
    backbone = load_backbone(cache_dir=str(APP_DIR / "model" / "runtime"))  # the app's ONNX encoder export
    pipeline = SPDPipeline(backbone, EmbeddingCache(1 << 30, work / "cache"))
    store = CheckpointStore(tmp_path / "trained")
    served = ModelReloader(store, pipeline)
    decoder = backbone.model.mask_decoder
    before = {k: v.clone() for k, v in decoder.state_dict().items()}

    result = SPDTrainer(pipeline, LABELS, store)({"max_epochs": 1, "head_epochs": 2, "max_minutes": 2,
                                                 "publish": "always"}, store_)

    assert result["published"] and result["version"] == 1 and store.current() == 1
    assert set(result["labels"]) <= set(LABELS)
    assert backbone.model.mask_decoder is decoder and pipeline.state == TrainedState(), "served model until refresh"
    assert all(torch.equal(before[k], v) for k, v in decoder.state_dict().items())
    meta = store.metadata()
    assert meta["train_volumes"] and meta["val_volumes"] and meta["history"][0]["stage"] == "saliency"
    assert set(meta["served_val_dice"]) == set(meta["val_dice"]) == set(result["labels"]), "same validation for both"
    work = meta["work"]
    assert 1 <= work["epochs"]["saliency"] <= 2 and work["epochs"]["decoder"] <= 1 and work == result["work"]
    assert set(work["stopped"]) == {"saliency", "decoder"} and work["decoder_steps"] >= work["epochs"]["decoder"]
    assert store.path(1, ".png").stat().st_size > 1000
    assert set(meta["size_priors"]) == set(result["labels"])
    assert served.refresh() == 1 and set(pipeline.state.saliency_heads) == set(result["labels"])
    assert set(pipeline.state.size_priors) == set(result["labels"]), "served with the sizes learned from the labels"
    name = result["labels"][0]
    assert pipeline.probe_config(name, meta["slice_axis"]) != pipeline.probes


def test_a_round_under_ddp_with_two_cpu_processes(cohort_datastore, tmp_path):
    store_, work = cohort_datastore
    options = {**CONFIG_DEFAULTS, "embedding_cache_dir": str(work / "cache")}
    factory = functools.partial(build_pipeline, options, str(APP_DIR / "model"))
    pipeline = factory()
    store = CheckpointStore(tmp_path / "trained")
    trainer = SPDTrainer(pipeline, LABELS, store, pipeline_factory=factory)

    result = trainer({"cpu_processes": 2, "max_epochs": 1, "head_epochs": 2, "max_minutes": 3, "publish": "always"},
                     store_)

    assert result["version"] == 1 and result["world_size"] == 2 and store.current() == 1
    meta = store.metadata()
    assert meta["world_size"] == 2 and [r["stage"] for r in meta["history"]].count("decoder") >= 1
    assert ModelReloader(store, pipeline).refresh() == 1 and set(pipeline.state.saliency_heads) == set(result["labels"])


def test_a_round_worse_than_the_served_model_is_not_published_unless_asked(tmp_path):
    pipeline = SPDPipeline(load_backbone(cache_dir=str(APP_DIR / "model" / "runtime")), EmbeddingCache(1 << 20))
    store = CheckpointStore(tmp_path / "trained")
    result = TrainingResult(SaliencyHead(["right_caudate"], axis=2), None, [], {"right_caudate": 0.41}, 0, ["a"], ["b"],
                            served_dice={"right_caudate": 0.52}, stopped={"saliency": TIME_BUDGET})

    refused = publish_round(store, pipeline, TrainedState(), result, 2, TrainConfig(), 10.0)

    assert not refused["published"] and refused["version"] is None and "below the served model" in refused["reason"]
    assert refused["work"]["cut_short"] and refused["served_val_dice"] == {"right_caudate": 0.52}
    assert store.current() is None and not list(store.directory.glob("v*")), "nothing written"
    forced = publish_round(store, pipeline, TrainedState(), result, 2, TrainConfig(), 10.0, always=True)
    assert forced["published"] and forced["version"] == 1 and store.metadata()["work"]["stopped"] == {"saliency": TIME_BUDGET}
    better = dataclasses.replace(result, val_dice={"right_caudate": 0.52})
    assert publish_round(store, pipeline, TrainedState(), better, 2, TrainConfig(), 10.0)["version"] == 2, "a tie is published"


@pytest.mark.parametrize("request_, message", [({"cpu_processes": "two"}, "cpu_processes"),
                                               ({"cpu_processes": 0}, "cpu_processes"),
                                               ({"multi_gpu": "ture"}, "multi_gpu must be true or false"),
                                               ({"max_epochs": -1}, "max_epochs"),
                                               ({"labels": "spleen"}, "unknown labels"),
                                               ({"publish": "never"}, "publish must be")])
def test_malformed_train_requests_are_refused_before_any_work(cohort_datastore, tmp_path, request_, message):
    store_, work = cohort_datastore
    pipeline = SPDPipeline(load_backbone(cache_dir=str(APP_DIR / "model" / "runtime")), EmbeddingCache(1 << 20))
    with pytest.raises(TrainRequestError, match=message):
        SPDTrainer(pipeline, LABELS, CheckpointStore(tmp_path / "trained"))(request_, store_)
