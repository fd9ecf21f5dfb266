"""Training building blocks: request parsing, volume splits, slabs, and decoding with gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lib.spd.method import training_axis
from lib.spd.runtime import PromptBatch, load_backbone
from lib.spd.runtime.differentiable_decoder import DifferentiableDecoder
from lib.spd.training.data import LabelledVolume, round_axis, slab_indices, split_by_volume
from lib.spd.training.progress import KeepBest
from lib.trainers.spd_trainer import DEFAULTS, TrainRequestError, parse_request

LABELS = {"left_caudate": 1, "right_caudate": 2}
CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")


def test_default_request_parses_to_a_bounded_round():
    config, val_fraction, labels, axis = parse_request({"model": "spd_sam", "client_id": "x", "gpus": "all"}, LABELS)
    assert config.max_epochs == DEFAULTS["max_epochs"] and config.max_seconds == 60 * DEFAULTS["max_minutes"]
    assert config.max_seconds <= 15 * 60
    assert val_fraction == DEFAULTS["val_fraction"] and labels == [] and axis is None


def test_request_values_are_checked():
    config, _, labels, axis = parse_request({"max_epochs": "3", "max_minutes": 1.5, "labels": "right_caudate",
                                             "slice_axis": 1}, LABELS)
    assert (config.max_epochs, config.max_seconds, labels, axis) == (3, 90.0, ["right_caudate"], 1)
    for bad, message in (({"max_epochs": "many"}, "max_epochs must be a number"),
                         ({"max_minutes": 0}, "max_minutes must be within"),
                         ({"labels": ["nope"]}, "unknown labels"),
                         ({"slice_axis": 3}, "slice_axis must be within")):
        with pytest.raises(TrainRequestError, match=message):
            parse_request(bad, LABELS)


def test_split_is_by_volume_and_keeps_a_training_volume():
    train, val = split_by_volume(["a", "b", "c", "d"], 0.25, seed=0)
    assert len(val) == 1 and sorted(train + val) == ["a", "b", "c", "d"]
    assert split_by_volume(["a", "b", "c", "d"], 0.25, seed=0) == (train, val), "deterministic"
    assert split_by_volume(["a"], 0.25, seed=0) == (["a"], [])
    assert len(split_by_volume(["a", "b"], 0.9, seed=0)[0]) == 1


def test_slab_covers_the_labels_plus_a_margin():
    labels = np.zeros((4, 4, 20), dtype=np.int32)
    labels[1, 1, 5:8] = 2
    labels[2, 2, 10] = 1
    assert slab_indices(labels, [2], axis=2, margin=2) == list(range(3, 10))
    assert slab_indices(labels, [1, 2], axis=2, margin=3) == list(range(2, 14))
    assert slab_indices(labels, [7], axis=2, margin=2) == []
    assert training_axis((1.0, 1.0, 2.5)) == 2 and training_axis((1.0, 1.0, 1.0)) == 2 and training_axis((3, 1, 1)) == 0


def test_keep_best_stops_after_patience():
    best = KeepBest(patience=2)
    for epoch, score in enumerate([0.5, 0.6, 0.55, 0.58]):
        best.update(score, epoch, lambda: {"epoch": epoch})
    assert (best.epoch, best.state, best.stop(3)) == (1, {"epoch": 1}, True)


@pytest.mark.skipif(not CH2.exists(), reason="mricron-data not installed")
def test_decoding_with_gradients_matches_serving():
    nib = pytest.importorskip("nibabel")
    image = nib.load(CH2).get_fdata(dtype=np.float32)[:, :, 76]
    image = np.clip(image / np.percentile(image, 99.5), 0, 1)[None]
    backbone = load_backbone(runtime="torch")
    embedding = backbone.embed(image)
    boxes = np.array([[90, 120, 125, 150]], dtype=np.float32)
    served = backbone.decode(embedding, PromptBatch(boxes=boxes), image.shape[1:])
    (logits,) = DifferentiableDecoder(backbone)([(embedding, boxes, image.shape[1:])])
    inside = served[0] > -20  # the serving window; outside it serving writes a constant
    assert np.abs(logits.detach().numpy()[0][inside] - served[0][inside]).max() < 1e-3
    logits.sigmoid().mean().backward()
    grads = [p.grad for p in backbone.model.mask_decoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "gradients reach the mask decoder"
    assert all(p.grad is None for p in backbone.model.prompt_encoder.parameters()), "the prompt encoder stays frozen"


def test_a_round_slices_along_the_axis_most_volumes_were_acquired_on():
    def volume(shape, spacing):
        return LabelledVolume("v", np.zeros(shape, np.float32), np.zeros(shape, np.int32), spacing, "v", None)

    axial, sagittal = volume((8, 8, 6), (1.0, 1.0, 2.5)), volume((6, 8, 8), (2.5, 1.0, 1.0))
    assert round_axis([sagittal, axial, axial]) == 2 and round_axis([sagittal, axial]) == 0, "majority, then first"
    assert round_axis([volume((8, 8, 1), (3.0, 1.0, 1.0))]) == 2, "never an axis whose slices are a voxel wide"


def test_only_monai_labels_train_process_limits_its_threads():
    import inspect

    import monailabel.utils.async_tasks.utils as launcher

    from lib.trainers import process_priority

    assert f'"{process_priority.TRAIN_PROCESS_MODULE}"' in inspect.getsource(launcher), (
        "MONAI Label no longer runs train tasks as `python -m monailabel.interfaces.utils.app`: "
        "update lib/trainers/process_priority.py")
    threads = torch.get_num_threads()
    assert not process_priority.in_train_process()
    assert process_priority.yield_to_requests() is False
    assert torch.get_num_threads() == threads, "the server process is left alone"
