"""LoRA adapters on a SAM ViT image encoder: identity at start, saved and served, trained in a round.

The backbone is a small randomly initialised SAM ViT registered as "medsam" (box-trained, so that stage 2
runs); the images are a synthetic Colin27 + AAL cohort.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from fast_paths_models import tiny_sam
from labelled_cohort import LABELS
from make_cohort import make_cohort

from lib.spd.method import SPDPipeline, VolumeView, choose_window, training_axis
from lib.spd.runtime import assemble_backbone, encoder_lora
from lib.spd.serving import CheckpointStore, EmbeddingCache, ModelReloader
from lib.spd.training import LabelledVolume, TrainConfig
from lib.spd.training.decoder_stage import DecoderTuner
from lib.trainers.spd_trainer import SPDTrainer, TrainRequestError

SIZE = 128


def tiny_medsam_pipeline(cache_dir) -> SPDPipeline:
    backbone = assemble_backbone("medsam", tiny_sam(SIZE), SIZE, "tiny0000", device="cpu", runtime="torch",
                                 cache_dir=str(cache_dir))
    return SPDPipeline(backbone, EmbeddingCache(1 << 30, cache_dir / "embeddings"))


def encode(encoder, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return encoder(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)))


def randomise(encoder, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in encoder_lora.adapters(encoder):
            adapter.up.copy_(0.05 * torch.randn(adapter.up.shape, generator=generator))


def test_new_adapters_change_nothing_and_removing_them_restores_the_encoder():
    encoder = tiny_sam(SIZE).image_encoder
    before = encode(encoder)
    added = encoder_lora.attach(encoder, rank=2, alpha=4.0)
    assert len(added) == len(encoder.blocks) and encoder_lora.adapters_fit(encoder)
    assert torch.equal(encode(encoder), before)
    assert all(not p.requires_grad for a in added for p in a.base.parameters())
    randomise(encoder)
    assert (encode(encoder) - before).abs().max() > 1e-3
    encoder_lora.detach(encoder)
    assert torch.equal(encode(encoder), before) and encoder_lora.state(encoder) is None
    assert not encoder_lora.adapters_fit(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_adapter_state_survives_weights_only_loading_and_bad_states_are_refused():
    source = tiny_sam(SIZE).image_encoder
    encoder_lora.attach(source, rank=2, alpha=4.0)
    randomise(source)
    buffer = io.BytesIO()
    torch.save({"encoder_adapters": encoder_lora.state(source)}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["encoder_adapters"]

    target = tiny_sam(SIZE).image_encoder
    encoder_lora.load(target, saved)
    assert torch.equal(encode(target), encode(source))
    assert encoder_lora.digest(saved) == encoder_lora.digest(encoder_lora.state(target)) != ""
    encoder_lora.attach(target, rank=2, alpha=4.0)
    assert encoder_lora.digest(encoder_lora.state(target)) != encoder_lora.digest(saved)

    with pytest.raises(ValueError, match="blocks"):
        encoder_lora.check(target, {**saved, "down": saved["down"][:-1], "up": saved["up"][:-1]})
    with pytest.raises(ValueError, match="shapes"):
        encoder_lora.check(target, {**saved, "rank": 3})
    with pytest.raises(ValueError, match="malformed"):
        encoder_lora.check(target, {"rank": 2})


@pytest.fixture(scope="module")
def cohort_volumes():
    volumes = []
    for subject in make_cohort(1, seed=3, labels=list(LABELS), crop_margin_mm=(20, 20, 2), slice_mm=4.0):
        spacing = tuple(float(v) for v in np.abs(np.diag(subject.affine)[:3]))
        volumes.append(LabelledVolume(subject.name, subject.image.astype(np.float32), subject.label.astype(np.int32),
                                      spacing, subject.name, choose_window(subject.image)))
    return volumes


def test_a_decoder_step_trains_the_adapters_through_the_encoder(cohort_volumes, tmp_path):
    pipeline = tiny_medsam_pipeline(tmp_path)
    volume = cohort_volumes[0]
    encoder = pipeline.backbone.model.image_encoder
    encoder_lora.attach(encoder, rank=2, alpha=4.0)
    config = TrainConfig(lora_rank=2, lora_lr=1e-2, slices_per_step=3, probes_per_step=1)
    tuner = DecoderTuner(pipeline, {"right_caudate": LABELS["right_caudate"]}, training_axis(volume.spacing), config)
    decoder_before = {k: v.clone() for k, v in tuner.module.state_dict().items()}

    tuner.step(volume, "right_caudate")

    assert all(a.up.abs().max() > 0 for a in tuner.adapters), "every adapter got a gradient step"
    assert any(not torch.equal(decoder_before[k], v) for k, v in tuner.module.state_dict().items())
    assert tuner.start_adapters != encoder_lora.digest(encoder_lora.state(encoder))


def test_served_model_installs_adapters_keys_embeddings_by_them_and_refuses_misfits(cohort_volumes, tmp_path, caplog):
    pipeline = tiny_medsam_pipeline(tmp_path)
    backbone, volume = pipeline.backbone, cohort_volumes[0]
    view = VolumeView(volume.volume, 2, volume.window)
    base = pipeline.embed(volume.volume_id, view, [0, 1]).clone()
    trained = tiny_sam(SIZE).image_encoder
    encoder_lora.attach(trained, rank=2, alpha=4.0)
    randomise(trained)
    adapters = encoder_lora.state(trained)
    store = CheckpointStore(tmp_path / "trained")
    metadata = {"backbone": "medsam", "weights_id": "tiny0000", "labels": []}
    store.publish({"saliency_heads": [], "decoder_state": None, "encoder_adapters": adapters}, metadata)
    served = ModelReloader(store, pipeline)

    assert served.refresh() == 1 and backbone.encoder_tag == encoder_lora.digest(adapters)
    adapted = pipeline.embed(volume.volume_id, view, [0, 1])
    assert pipeline.cache_key(volume.volume_id, view).count(backbone.encoder_tag) == 1
    assert (adapted.float() - base.float()).abs().max() > 1e-3, "adapted embeddings, not the cached base ones"

    misfit = {**adapters, "down": adapters["down"][:-1], "up": adapters["up"][:-1]}
    store.publish({"saliency_heads": [], "decoder_state": None, "encoder_adapters": misfit}, metadata)
    with caplog.at_level(logging.ERROR):
        assert served.refresh() == 1
    assert "refusing checkpoint v0002" in caplog.text and backbone.encoder_tag == encoder_lora.digest(adapters)

    store.publish({"saliency_heads": [], "decoder_state": None, "encoder_adapters": None}, metadata)
    assert served.refresh() == 3 and backbone.encoder_tag == "" and not encoder_lora.adapters(backbone.model.image_encoder)
    assert torch.equal(pipeline.embed(volume.volume_id, view, [0, 1]), base)


def test_a_lora_round_publishes_adapters_and_a_head_for_the_encoder_it_publishes(cohort_datastore, tmp_path):
    store_, _ = cohort_datastore
    pipeline = tiny_medsam_pipeline(tmp_path)
    encoder = pipeline.backbone.model.image_encoder
    before = encode(encoder)
    store = CheckpointStore(tmp_path / "trained")
    request = {"max_epochs": 2, "head_epochs": 3, "max_minutes": 3, "lora_rank": 2, "lora_lr": 0.01, "patience": 2}

    result = SPDTrainer(pipeline, LABELS, store)(request, store_)

    assert result["version"] == 1
    assert pipeline.backbone.encoder_tag == "" and not encoder_lora.adapters(encoder), "served encoder untouched"
    assert torch.equal(encode(encoder), before)
    checkpoint = store.load(1, "medsam", "tiny0000")
    adapters = checkpoint["encoder_adapters"]
    assert adapters["rank"] == 2 and len(adapters["down"]) == len(encoder.blocks)
    assert checkpoint["metadata"]["encoder_adapters"] == encoder_lora.digest(adapters)
    stages = [r["stage"] for r in checkpoint["metadata"]["history"]]
    changed = any(u.abs().max() > 0 for u in adapters["up"])
    assert changed == (result["decoder_epoch"] > 0)
    assert ("saliency refit" in stages) == changed, "the head is refitted exactly when the encoder changed"

    assert ModelReloader(store, pipeline).refresh() == 1
    assert pipeline.backbone.encoder_tag == encoder_lora.digest(adapters)


def test_lora_needs_a_box_trained_vit(cohort_datastore, tmp_path):
    store_, _ = cohort_datastore
    backbone = assemble_backbone("vit_b", tiny_sam(SIZE), SIZE, "tiny0000", device="cpu", runtime="torch",
                                 cache_dir=str(tmp_path))
    pipeline = SPDPipeline(backbone, EmbeddingCache(1 << 20))
    with pytest.raises(TrainRequestError, match="lora_rank.*medsam"):
        SPDTrainer(pipeline, LABELS, CheckpointStore(tmp_path / "trained"))({"lora_rank": 4}, store_)
