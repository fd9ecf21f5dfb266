"""Embedding cache: computes only what is missing, persists, evicts under its budget."""

import logging

import numpy as np
import torch

from lib.spd.embedding_cache import EmbeddingCache


class CountingEncoder:
    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, slices):
        self.calls.append(list(slices))
        return torch.stack([torch.full((4, 2, 2), float(s)) for s in slices])


def test_computes_only_missing_slices_and_returns_in_order(tmp_path):
    enc = CountingEncoder()
    cache = EmbeddingCache(1 << 20, tmp_path)
    first = cache.get("vol", [3, 4, 5], enc)
    again = cache.get("vol", [5, 4, 6], enc)
    assert enc.calls == [[3, 4, 5], [6]]
    assert first.dtype == torch.float16 and first.shape == (3, 4, 2, 2)
    assert [int(e[0, 0, 0]) for e in again] == [5, 4, 6]


def test_persists_across_instances(tmp_path):
    EmbeddingCache(1 << 20, tmp_path).get("vol", [1, 2], CountingEncoder())
    enc = CountingEncoder()
    out = EmbeddingCache(1 << 20, tmp_path).get("vol", [1, 2], enc)
    assert enc.calls == [] and int(out[1, 0, 0, 0]) == 2
    assert not list(tmp_path.rglob("*.tmp")), "no temp files left behind"


def test_budget_evicts_least_recently_used():
    one_slice = 4 * 2 * 2 * 2  # float16 bytes
    cache = EmbeddingCache(3 * one_slice, None)
    enc = CountingEncoder()
    cache.get("vol", [0, 1, 2], enc)
    cache.get("vol", [0], enc)  # touch 0: 1 is now the oldest
    cache.get("vol", [3], enc)
    assert cache.bytes_in_memory <= 3 * one_slice
    assert cache.missing("vol", [0, 1, 2, 3]) == [1]


def test_keys_are_independent(tmp_path):
    cache = EmbeddingCache(1 << 20, tmp_path)
    cache.get("a", [0], CountingEncoder())
    assert cache.missing("b", [0]) == [0]


def test_damaged_files_are_embedded_again_with_a_warning(tmp_path, caplog):
    EmbeddingCache(1 << 20, tmp_path).get("vol", [1, 2, 3, 4], CountingEncoder())
    folder = tmp_path / "vol"
    (folder / "00001.npy").write_bytes((folder / "00001.npy").read_bytes()[:40])  # cut short
    (folder / "00002.npy").write_bytes(b"not an array")
    np.save(folder / "00003.npy", np.zeros((4, 3, 3), np.float16))  # another shape than the key's slices
    enc = CountingEncoder()
    with caplog.at_level(logging.WARNING):
        out = EmbeddingCache(1 << 20, tmp_path).get("vol", [1, 2, 3, 4], enc)
    assert enc.calls == [[1, 2], [3]] and "2 damaged file(s)" in caplog.text and "1 damaged file(s)" in caplog.text
    assert [int(e[0, 0, 0]) for e in out] == [1, 2, 3, 4] and out.shape == (4, 4, 2, 2)
    again = CountingEncoder()
    EmbeddingCache(1 << 20, tmp_path).get("vol", [1, 2, 3, 4], again)
    assert again.calls == [], "the files were written again, whole"
