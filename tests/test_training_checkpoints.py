"""Checkpoints: atomic publish, versioning, refusal of corrupt or incompatible files, reload without restart."""

from __future__ import annotations

import logging
import os
import threading
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lib.spd.method import TrainedState
from lib.spd.method.saliency_head import LabelSaliency, SaliencyHead
from lib.spd.serving import CheckpointError, CheckpointStore, ModelReloader

BACKBONE = {"backbone": "lite_medsam", "weights_id": "0123456789abcdef"}


class FakePipeline:
    """What ModelReloader touches: a backbone with a mask decoder, the base decoder, and the state switch."""

    def __init__(self):
        model = nn.Module()
        model.mask_decoder = self.base_decoder = nn.Linear(4, 2)
        self.backbone = SimpleNamespace(name=BACKBONE["backbone"], weights_id=BACKBONE["weights_id"], model=model,
                                        encoder_tag="")
        self.state = TrainedState()
        self.resets = 0

    def serve(self, state):
        self.backbone.model.mask_decoder = state.decoder or self.base_decoder
        self.state = state
        self.resets += 1

def payload(fill: float, labels=("right_caudate",)) -> dict:
    head = SaliencyHead(list(labels), in_channels=8, width=8)
    decoder = nn.Linear(4, 2)
    nn.init.constant_(decoder.weight, fill)
    return {"saliency_heads": [{"config": head.config(), "state": head.state_dict()}],
            "decoder_state": decoder.state_dict()}


def test_publish_versions_and_pointer(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=3)
    assert store.current() is None and store.candidates() == []
    for n in range(1, 5):
        assert store.publish(payload(n), {**BACKBONE, "val_dice": {"x": 0.5}}, {".png": b"png"}) == n
    assert store.current() == 4 and store.versions() == [2, 3, 4], "older versions are pruned"
    assert (tmp_path / "ckpt" / "v0004.png").read_bytes() == b"png"
    assert store.metadata()["version"] == 4 and store.metadata(3)["val_dice"] == {"x": 0.5}
    loaded = store.load(4, **BACKBONE)
    assert torch.all(loaded["decoder_state"]["weight"] == 4)
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")], "no temp file left behind"


def test_a_crash_while_publishing_keeps_the_published_version(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.publish(payload(1), BACKBONE)
    real_replace = os.replace

    def crash_on_checkpoint(src, dst):
        if str(dst).endswith(".pt"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_checkpoint)
    with pytest.raises(OSError):
        store.publish(payload(2), BACKBONE)
    monkeypatch.undo()
    assert store.current() == 1 and store.versions() == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_reader_never_sees_a_half_written_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=100)
    store.publish(payload(0), BACKBONE)
    failures, done = [], threading.Event()

    def read_forever():
        while not done.is_set():
            version = store.current()
            try:
                assert store.load(version, **BACKBONE)["metadata"]["version"] == version
            except (CheckpointError, AssertionError) as error:
                failures.append(error)

    reader = threading.Thread(target=read_forever)
    reader.start()
    for n in range(1, 12):
        store.publish(payload(n), BACKBONE)
    done.set()
    reader.join()
    assert not failures, failures[:3]


def test_model_reloader_reloads_without_restart_and_refuses_bad_checkpoints(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    pipeline = FakePipeline()
    base = pipeline.backbone.model.mask_decoder
    served = ModelReloader(store, pipeline)
    assert served.refresh() is None and pipeline.backbone.model.mask_decoder is base

    store.publish(payload(1), BACKBONE)
    assert served.refresh() == 1
    assert torch.all(pipeline.backbone.model.mask_decoder.weight == 1)
    assert isinstance(pipeline.state.saliency_heads["right_caudate"], LabelSaliency)
    resets = pipeline.resets
    assert served.refresh() == 1 and pipeline.resets == resets, "an unchanged pointer costs one stat, no reload"

    store.publish(payload(2), BACKBONE)
    store.path(2).write_bytes(store.path(2).read_bytes()[:1000])  # truncated newest
    with caplog.at_level(logging.ERROR):
        assert served.refresh() == 1
    assert "refusing checkpoint v0002" in caplog.text and "truncated" in caplog.text
    assert torch.all(pipeline.backbone.model.mask_decoder.weight == 1), "the previous model stays in service"

    store.publish(payload(3), {**BACKBONE, "weights_id": "another"})
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert served.refresh() == 1
    assert "serving lite_medsam (0123456789abcdef)" in caplog.text

    wrong_shapes = payload(4)
    wrong_shapes["decoder_state"] = nn.Linear(3, 2).state_dict()
    store.publish(wrong_shapes, BACKBONE)
    assert served.refresh() == 1

    store.publish(payload(5), BACKBONE)
    assert served.refresh() == 5 and torch.all(pipeline.backbone.model.mask_decoder.weight == 5)


def test_fresh_process_falls_back_to_the_newest_valid_version(tmp_path):
    store = CheckpointStore(tmp_path)
    store.publish(payload(1), BACKBONE)
    store.publish(payload(2), BACKBONE)
    store.path(2).write_bytes(b"not a checkpoint")
    pipeline = FakePipeline()
    assert ModelReloader(store, pipeline).refresh() == 1
    assert torch.all(pipeline.backbone.model.mask_decoder.weight == 1)


def test_unpublished_version_is_not_served(tmp_path):
    store = CheckpointStore(tmp_path)
    store.publish(payload(1), BACKBONE)
    store.pointer.unlink()  # e.g. a round that wrote its file but was stopped before the pointer
    pipeline = FakePipeline()
    assert ModelReloader(store, pipeline).refresh() is None


def test_later_heads_take_over_their_labels(tmp_path):
    store = CheckpointStore(tmp_path)
    old, new = payload(1, ("left_caudate", "right_caudate")), payload(1, ("right_caudate",))
    store.publish({**new, "saliency_heads": old["saliency_heads"] + new["saliency_heads"]}, BACKBONE)
    pipeline = FakePipeline()
    ModelReloader(store, pipeline).refresh()
    heads = pipeline.state.saliency_heads
    assert set(heads) == {"left_caudate", "right_caudate"}
    assert heads["left_caudate"].head is not heads["right_caudate"].head
