"""The GPU fast paths, checked on the CPU: SDPA attention, batched decoding, chunked and multi-device
encoding, out-of-memory retries, lazy windowing and the GPU benchmark's CPU mode."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fast_paths_models import tiny_sam

from lib.spd.method import VolumeView
from lib.spd.method.intensity import IntensityWindow
from lib.spd.runtime import EncoderRunner, EncoderSettings, PromptBatch, assemble_backbone
from lib.spd.runtime.sam_attention import SDPAAttention, use_sdpa_attention

ROOT = Path(__file__).resolve().parents[1]


def test_sdpa_attention_equals_stock_attention():
    stock = tiny_sam().image_encoder
    fast = copy.deepcopy(stock)
    assert use_sdpa_attention(fast) == 4
    assert all(isinstance(block.attn, SDPAAttention) for block in fast.blocks)
    assert list(fast.state_dict()) == list(stock.state_dict()), "state-dict keys must not change"
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        expected = stock(x)
        assert torch.allclose(fast(x), expected, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fast(x).float()
    error = (low - expected).abs()
    assert error.mean() < 0.02 * expected.abs().mean() and error.max() < 0.1, "bf16 outside tolerance"


def test_the_bias_folded_into_queries_and_keys_equals_the_bias_as_a_mask():
    """The GPU's mask-free form (flash kernels) gives the masked form's output, on global and windowed blocks
    alike, exactly in float32 and within bf16's precision in bf16."""
    encoder = tiny_sam().image_encoder
    use_sdpa_attention(encoder)
    for block in encoder.blocks:
        attn = block.attn
        with torch.no_grad():  # a trained model's embeddings are not zero
            attn.rel_pos_h.normal_(0, 0.5)
            attn.rel_pos_w.normal_(0, 0.5)
        size = attn.rel_pos_h.shape[0] // 2 + 1  # the block's grid (global) or window
        q, k, v = torch.randn(3, 2, attn.num_heads, size * size, attn.rel_pos_h.shape[1])
        masked = attn.masked_attention(q, k, v, size, size)
        assert torch.allclose(attn.folded_attention(q, k, v, size, size), masked, atol=1e-5)
        low = attn.folded_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), size, size).float()
        assert (low - masked).abs().mean() < 0.02 * masked.abs().mean()


def test_sdpa_attention_depends_on_relative_positions():
    encoder = tiny_sam().image_encoder
    use_sdpa_attention(encoder)
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        before = encoder(x)
        for block in encoder.blocks:
            block.attn.rel_pos_h.zero_()
        assert not torch.allclose(encoder(x), before, atol=1e-3)


@pytest.fixture(scope="module")
def sam_backbone():
    return assemble_backbone("vit_b", tiny_sam(), 128, "tiny", device="cpu", runtime="torch")


def _prompts(n: int, shape: tuple[int, int], rng: np.random.Generator) -> PromptBatch:
    rows, cols = shape
    centres = rng.uniform(0.3, 0.7, (n, 2)) * [rows, cols]
    boxes = np.concatenate([centres - 8, centres + 8], axis=1).astype(np.float32)
    points = np.stack([centres, centres + 5], axis=1).astype(np.float32)
    labels = np.array([[1, 0]] * n)
    labels[0, 1] = -1  # padding
    return PromptBatch(boxes, points, labels, rng.normal(0, 2, (n, *shape)).astype(np.float32))


def test_batched_decoding_equals_slice_by_slice(sam_backbone):
    rng = np.random.default_rng(0)
    shape = (90, 120)
    embeddings = sam_backbone.embed(rng.random((5, *shape), dtype=np.float32))
    prompts = _prompts(5, shape, rng)
    sam_backbone.crop_decoding = False
    try:
        sam_backbone.batch_decoding = False
        one_by_one = sam_backbone.decode(embeddings, prompts, shape)
        sam_backbone.batch_decoding = True
        batched = sam_backbone.decode(embeddings, prompts, shape)
    finally:
        sam_backbone.batch_decoding, sam_backbone.crop_decoding = False, True
    assert batched.shape == (5, *shape)
    assert np.abs(batched - one_by_one).max() < 1e-3 * max(1.0, np.abs(one_by_one).max())
    assert (batched > 0).any() and (batched < 0).any()


def test_the_encoder_reads_voxels_as_stored_and_windows_them_where_it_runs(sam_backbone):
    volume = np.random.default_rng(2).normal(40, 300, (5, 100, 100)).astype(">i2")  # big-endian CT, as some files are
    view = VolumeView(volume, 0, IntensityWindow(-160.0, 240.0, "CT"))
    windowed = []

    def window(batch):
        windowed.append(batch.dtype)
        return view.window.apply(batch)

    raw = sam_backbone.embed_lazily(view.voxels, [1, 3, 4], (100, 100), window)
    assert windowed and set(windowed) == {torch.int16}, "the host hands the encoder int16, not floats"
    assert torch.equal(raw, sam_backbone.embed(view.slices([1, 3, 4])))


def test_chunked_and_multi_device_encoding_equal_one_call(sam_backbone):
    slices = np.random.default_rng(1).random((7, 100, 100), dtype=np.float32)
    reads = []

    def read(chunk):
        reads.append(list(chunk))
        return slices[chunk]

    settings = sam_backbone.runner.settings
    single, hooks = sam_backbone.runner, []
    try:
        settings.chunk = 7
        whole = sam_backbone.embed(slices)
        settings.chunk = 2
        chunked = sam_backbone.embed_lazily(read, range(7), (100, 100))
        sam_backbone.runner = EncoderRunner(sam_backbone.model.image_encoder, ["cpu", "cpu"], settings)
        calls = [0, 0]
        hooks = [replica.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
                 for n, replica in enumerate(sam_backbone.runner.replicas)]
        spread = sam_backbone.embed(slices)
    finally:
        settings.chunk = 0
        sam_backbone.runner = single
        for hook in hooks:
            hook.remove()
    assert torch.allclose(chunked, whole, atol=1e-5) and torch.allclose(spread, whole, atol=1e-5)
    assert calls == [2, 2], "the 4 chunks of 2 slices are dealt out to both replicas"
    assert max(len(chunk) for chunk in reads) == 2, "slices must be read chunk by chunk, not all at once"
    assert sorted(s for chunk in reads for s in chunk) == list(range(7))


class OutOfMemoryAbove(torch.nn.Module):
    """An encoder that raises CUDA's out-of-memory error for batches larger than ``limit``."""

    def __init__(self, encoder: torch.nn.Module, limit: int):
        super().__init__()
        self.encoder = encoder
        self.limit = limit
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return self.encoder(x)


def test_out_of_memory_halves_the_chunk(sam_backbone, caplog):
    slices = np.random.default_rng(2).random((6, 128, 128), dtype=np.float32)
    encoder = OutOfMemoryAbove(sam_backbone.model.image_encoder, limit=1)
    runner = EncoderRunner(encoder, ["cpu"], EncoderSettings(chunk=6))
    to_input = lambda batch: batch[:, None].expand(-1, 3, -1, -1)  # noqa: E731
    with caplog.at_level(logging.WARNING):
        out = runner.run(lambda chunk: slices[chunk], range(6), to_input)
    with torch.inference_mode():
        expected = sam_backbone.model.image_encoder(to_input(torch.from_numpy(slices)))
    assert torch.allclose(out, expected, atol=1e-5)
    assert encoder.batches[:3] == [6, 3, 1], "halving: 6 -> 3 -> 1 slices"
    assert "CUDA out of memory encoding 6 slices" in caplog.text


def test_gpu_benchmark_runs_in_cpu_mode(tmp_path):
    report = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--device", "cpu", "--backbones",
                          "lite_medsam", "--slices", "2", "--size", "64", "--stock-slices", "1", "--json", str(report)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "stock" in run.stdout and "re-click" in run.stdout
    result = json.loads(report.read_text())["results"][0]
    assert result["stock_slices_per_s"] > 0 and result["spd_slices_per_s"] > 0
    assert result["spd_timings_s"]["embed"] > 0 and len(result["reclick"]) == 2
