"""Appearance saliency: its intensity model when many clicks drift off the structure, and its embedding similarity."""

import numpy as np
import torch
import torch.nn.functional as F

from lib.spd.method.saliency import AppearanceSaliency, densest_half, embedding_grid_to_slice
from lib.spd.method.saliency_head import SaliencyHead


def test_the_densest_half_of_click_intensities_stays_on_the_structure():
    """Eight clicks on the structure, four on its partial-volume edge, four on the fat around it: the median of all
    sixteen lies between tissue and edge, the densest half on the tissue, and its spread is the tissue's."""
    rng = np.random.default_rng(0)
    tissue, edge, fat = rng.uniform(0.47, 0.49, 8), rng.uniform(0.30, 0.40, 4), rng.uniform(0.17, 0.19, 4)
    values = rng.permutation(np.concatenate([tissue, edge, fat]))
    centre, spread = densest_half(values)
    assert tissue.min() <= centre <= tissue.max()
    assert np.median(values) < tissue.min() - 0.02  # control: the plain median is pulled off the tissue
    assert spread < 0.08 and (centre - fat.max()) / spread > 3.5  # fat lies far outside the model


def test_the_densest_half_of_one_normal_cluster_gives_its_mean_and_deviation():
    values = np.random.default_rng(1).normal(0.5, 0.1, 2000)
    centre, spread = densest_half(values)
    assert abs(centre - 0.5) < 0.02 and abs(spread - 0.1) < 0.015


def test_embedding_similarity_is_the_cosine_to_the_clicked_cells_whatever_the_chunk():
    """Chunk by chunk in one float32 buffer, the similarity equals each cell's cosine to the median clicked embedding
    computed on the whole stack at once, scaled between the stack's median and the clicked cells' median."""
    torch.manual_seed(0)
    embeddings = torch.randn(5, 16, 8, 8).half()
    clicks = [(0, 10.0, 12.0), (2, 20.0, 5.0), (4, 3.0, 30.0)]
    shape = (32, 32)
    cells = [(n, int(r * 8 / 32), int(c * 8 / 32)) for n, r, c in clicks]
    vectors = F.normalize(torch.stack([embeddings[n, :, r, c].float() for n, r, c in cells]), dim=1)
    reference = F.normalize(vectors.median(dim=0).values, dim=0)
    cosine = F.cosine_similarity(embeddings.float(), reference.view(1, -1, 1, 1), dim=1)
    high = torch.stack([cosine[n, r, c] for n, r, c in cells]).median()
    expected = embedding_grid_to_slice(((cosine - cosine.median()) / (high - cosine.median())).clamp(0, 1), shape)
    saliency = AppearanceSaliency()
    for chunk_bytes in (1, 2 * 16 * 64 * 4, 1 << 30):  # one slice, two, all at once
        got = saliency._embedding_similarity(embeddings, clicks, shape, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(got, expected.clamp(0, 1), atol=1e-5, rtol=0)


def test_a_trained_heads_maps_do_not_depend_on_the_chunk():
    torch.manual_seed(0)
    head = SaliencyHead(["a", "b"], in_channels=16, width=8)
    embeddings, images = torch.randn(5, 16, 8, 8).half(), np.zeros((5, 32, 32), np.float32)
    one, all_at_once = head.for_label("b"), head.for_label("b")
    one.chunk_bytes, all_at_once.chunk_bytes = 1, 1 << 30
    np.testing.assert_allclose(one(images, embeddings, []), all_at_once(images, embeddings, []), atol=1e-6)


def test_the_intensity_model_reads_each_clicks_patch_cut_where_the_slice_ends():
    """The clicked intensities are the medians of 3 x 3 patches, fewer pixels at the slice's edges (an even count:
    the mean of the middle two); the model's centre is the densest half of them."""
    images = torch.from_numpy(np.random.default_rng(2).random((2, 6, 5), dtype=np.float32))
    clicks = [(0, 0.0, 0.0), (1, 5.4, 2.0), (0, 2.6, 4.0), (1, 3.0, 2.0)]
    medians = [np.median(images.numpy()[0, :2, :2]), np.median(images.numpy()[1, 4:, 1:4]),
               np.median(images.numpy()[0, 2:5, 3:]), np.median(images.numpy()[1, 2:5, 1:4])]
    centre, spread = densest_half(np.array(medians))
    z = (images - centre) / max(spread, 0.04)
    expected = torch.exp(-0.125 * z * z)
    assert torch.equal(AppearanceSaliency()._intensity_likelihood(images, clicks), expected)
