"""The CUDA paths on a real GPU (skipped where none is visible; CI has none): bf16 SDPA attention at
ViT-B size (on flash kernels), batched decoding, the memory budget of chunked embedding, the out-of-memory fallback, and
the stages after embedding on the device, and embeddings from the GPU in the cache's files."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from fast_paths_models import tiny_sam
from torch.nn.attention import SDPBackend, sdpa_kernel

from lib.spd.runtime import EncoderRunner, EncoderSettings, PromptBatch, assemble_backbone
from lib.spd.runtime.sam_attention import use_sdpa_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda", 0)


def test_sdpa_bf16_matches_stock_float32_at_vit_b_size():
    from segment_anything import sam_model_registry

    stock = sam_model_registry["vit_b"](checkpoint=None).image_encoder.eval().to(CUDA)
    for name, parameter in stock.named_parameters():
        if "rel_pos" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    fast = copy.deepcopy(stock)
    assert use_sdpa_attention(fast) == 12
    x = torch.randn(2, 3, 1024, 1024, device=CUDA)
    with torch.inference_mode():
        expected = stock(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fast(x).float()
    error = (got - expected).abs()
    print(f"bf16 SDPA vs float32 stock: max {error.max():.4f}, mean {error.mean():.5f}, "
          f"mean |output| {expected.abs().mean():.4f}")
    assert error.mean() < 0.02 * expected.abs().mean()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = fast(x).float()  # raises where a block still needs a mask (flash kernels take none)
    assert (flash - got).abs().mean() < 0.01 * got.abs().mean()


def test_batched_decoding_on_cuda_equals_slice_by_slice():
    backbone = assemble_backbone("vit_b", tiny_sam(), 128, "tiny", device="cuda:0", runtime="torch")
    rng = np.random.default_rng(0)
    shape = (96, 96)
    embeddings = backbone.embed(rng.random((6, *shape), dtype=np.float32))
    centres = rng.uniform(30, 60, (6, 2))
    prompts = PromptBatch(np.concatenate([centres - 8, centres + 8], axis=1).astype(np.float32),
                           centres[:, None].astype(np.float32), np.ones((6, 1), dtype=np.int64),
                           rng.normal(0, 2, (6, *shape)).astype(np.float32))
    assert backbone.batch_decoding
    batched = backbone.decode(embeddings, prompts, shape)
    backbone.batch_decoding, backbone.crop_decoding = False, False
    one_by_one = backbone.decode(embeddings, prompts, shape)
    assert np.abs(batched - one_by_one).max() < 1e-2 * max(1.0, np.abs(one_by_one).max())


def test_chunks_fit_the_memory_budget():
    from segment_anything import sam_model_registry

    encoder = sam_model_registry["vit_b"](checkpoint=None).image_encoder.eval().to(CUDA)
    use_sdpa_attention(encoder)
    budget = 4 << 30
    runner = EncoderRunner(encoder, [CUDA], EncoderSettings(memory_budget_bytes=budget))
    slices = np.random.default_rng(0).random((24, 1024, 1024), dtype=np.float32)
    to_input = lambda batch: batch[:, None].expand(-1, 3, -1, -1)  # noqa: E731
    chunk = runner.chunk_size(CUDA, to_input, lambda chunk: slices[chunk], 0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = runner.run(lambda chunk: slices[chunk], range(24), to_input)
    used = torch.cuda.max_memory_allocated() - before
    print(f"budget {budget / 2**30:.1f} GiB: chunk {chunk}, peak {used / 2**30:.2f} GiB")
    assert out.shape == (24, 256, 64, 64) and 1 < chunk < 24
    assert used <= 1.1 * budget


def test_real_out_of_memory_falls_back_to_smaller_chunks_then_cpu(caplog):
    sam = tiny_sam(image_size=512)  # 1024 tokens: global attention needs far more than the limit set below
    slices = np.random.default_rng(3).random((3, 512, 512), dtype=np.float32)
    to_input = lambda batch: batch[:, None].expand(-1, 3, -1, -1)  # noqa: E731
    with torch.inference_mode():
        expected = sam.image_encoder(to_input(torch.from_numpy(slices)))
    encoder = sam.image_encoder.to(CUDA)
    runner = EncoderRunner(encoder, [CUDA], EncoderSettings(chunk=3, precision="float32"))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved() / total)  # no new segment fits
    try:
        with caplog.at_level(logging.WARNING):
            out = runner.run(lambda chunk: slices[chunk], range(3), to_input)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert "retrying in chunks of 1" in caplog.text and "encoding it on the CPU" in caplog.text
    assert torch.allclose(out.float().cpu(), expected, atol=2e-2, rtol=1e-2)


def test_the_stages_after_embedding_on_cuda_give_the_cpus_mask(tmp_path):
    """Given the same embeddings (one cache) and the same decoding (slice by slice, cropped), saliency, CPD, box probing
    (every probe in one call), decoding and assembly on the GPU give the mask the CPU gives."""
    from lib.spd.method import Click, SPDPipeline, choose_window
    from lib.spd.runtime import load_backbone
    from lib.spd.serving import EmbeddingCache

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:64, :72]
    volume = rng.normal(100, 8, (64, 72, 24)).astype(np.float32)
    for k in range(4, 20):
        volume[:, :, k] += 120 * ((rows - 30 - 0.3 * k) ** 2 + (cols - 36) ** 2 <= 81)
    clicks = [Click((31 + k // 4, 37, k), True) for k in range(5, 19, 3)]
    cache = EmbeddingCache(1 << 30)
    masks = []
    for device in ("cpu", "cuda:0"):
        backbone = load_backbone(device=device, cache_dir=str(tmp_path))
        backbone.batch_decoding = False  # the CPU's decoding path, so that only the stages' device differs
        seg = SPDPipeline(backbone, cache).segment(volume, (1.0, 1.0, 1.0), "tube", clicks, choose_window(volume),
                                                   slice_axis=2)
        masks.append(seg.mask)
    cpu, gpu = masks
    assert cpu.sum() > 1000
    assert 2 * (cpu & gpu).sum() / (cpu.sum() + gpu.sum()) >= 0.999


def test_embeddings_made_on_cuda_reach_the_cache_files_as_the_request_used_them(tmp_path):
    """The encoder windows the stored voxels on the GPU, and the cache's writer copies its output to the host on a
    side stream: the files hold the embeddings the request decoded from, and they equal those of slices windowed on
    the host."""
    from lib.spd.method import SPDPipeline, VolumeView, choose_window
    from lib.spd.runtime import load_backbone
    from lib.spd.serving import EmbeddingCache

    volume = np.random.default_rng(0).normal(40, 300, (96, 80, 12)).astype(np.int16)
    view = VolumeView(volume, 2, choose_window(volume, "CT"))
    backbone = load_backbone(device="cuda:0", cache_dir=str(tmp_path / "runtime"))
    pipeline = SPDPipeline(backbone, EmbeddingCache(1 << 30, tmp_path / "emb"))
    used = pipeline.embed("vol", view, list(range(12)), CUDA)
    pipeline.cache.flush()
    stored = EmbeddingCache(1 << 30, tmp_path / "emb").get(pipeline.cache_key("vol", view), list(range(12)),
                                                          lambda todo: pytest.fail(f"slices {todo} not on disk"))
    assert used.device.type == "cuda" and torch.equal(stored, used.cpu())
    host_windowed = backbone.embed(view.slices(range(12)))
    assert torch.allclose(used.float(), host_windowed.float(), atol=1e-2, rtol=1e-2)
