"""Embedding cache: computes only what is missing, persists on its writer thread, evicts under its budget."""

import logging
import os
import threading

import numpy as np
import torch

from lib.spd.serving import EmbeddingCache


class CountingEncoder:
    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, slices):
        self.calls.append(list(slices))
        return torch.stack([torch.full((4, 2, 2), float(s)) for s in slices])


class Settled(EmbeddingCache):
    """Waits for its writes after each request, so that the files and the order of use are known."""

    def get(self, *args, **kwargs):
        out = super().get(*args, **kwargs)
        self.flush()
        return out


def test_computes_only_missing_slices_and_returns_in_order(tmp_path):
    enc = CountingEncoder()
    cache = EmbeddingCache(1 << 20, tmp_path)
    first = cache.get("vol", [3, 4, 5], enc)
    again = cache.get("vol", [5, 4, 6], enc)
    assert enc.calls == [[3, 4, 5], [6]]
    assert first.dtype == torch.float16 and first.shape == (3, 4, 2, 2)
    assert [int(e[0, 0, 0]) for e in again] == [5, 4, 6]


def test_persists_across_instances(tmp_path):
    Settled(1 << 20, tmp_path).get("vol", [1, 2], CountingEncoder())
    enc = CountingEncoder()
    out = EmbeddingCache(1 << 20, tmp_path).get("vol", [1, 2], enc)
    assert enc.calls == [] and int(out[1, 0, 0, 0]) == 2
    assert not list(tmp_path.rglob("*.tmp")), "no temp files left behind"


def test_budget_evicts_least_recently_used():
    one_slice = 4 * 2 * 2 * 2  # float16 bytes
    cache = Settled(3 * one_slice, None)
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
    Settled(1 << 20, tmp_path).get("vol", [1, 2, 3, 4], CountingEncoder())
    folder = tmp_path / "vol"
    (folder / "00001.npy").write_bytes((folder / "00001.npy").read_bytes()[:40])  # cut short
    (folder / "00002.npy").write_bytes(b"not an array")
    np.save(folder / "00003.npy", np.zeros((4, 3, 3), np.float16))  # another shape than the key's slices
    enc = CountingEncoder()
    with caplog.at_level(logging.WARNING):
        out = Settled(1 << 20, tmp_path).get("vol", [1, 2, 3, 4], enc)
    assert enc.calls == [[1, 2], [3]] and "2 damaged file(s)" in caplog.text and "1 damaged file(s)" in caplog.text
    assert [int(e[0, 0, 0]) for e in out] == [1, 2, 3, 4] and out.shape == (4, 4, 2, 2)
    again = CountingEncoder()
    EmbeddingCache(1 << 20, tmp_path).get("vol", [1, 2, 3, 4], again)
    assert again.calls == [], "the files were written again, whole"


ONE_SLICE = 4 * 2 * 2 * 2  # float16 bytes of a CountingEncoder slice


def slice_file_bytes(tmp_path) -> int:
    Settled(1 << 20, tmp_path / "probe").get("vol", [0], CountingEncoder())
    return (tmp_path / "probe" / "vol" / "00000.npy").stat().st_size


def on_disk(folder) -> dict[str, list[int]]:
    return {d.name: sorted(int(f.stem) for f in d.glob("*.npy")) for d in sorted(folder.iterdir())}


def test_disk_budget_evicts_least_recently_used_files(tmp_path):
    one_file, folder = slice_file_bytes(tmp_path), tmp_path / "cache"
    cache = Settled(ONE_SLICE, folder, disk_budget_bytes=3 * one_file)  # memory holds one slice
    enc = CountingEncoder()
    cache.get("a", [0, 1], enc)
    cache.get("b", [0], enc)
    cache.get("a", [0], enc)  # read again, from disk: a/1 is now the oldest
    cache.get("c", [0], enc)
    assert on_disk(folder) == {"a": [0], "b": [0], "c": [0]}
    for i in range(1, 6):
        cache.get("d", [i], enc)
    assert on_disk(folder) == {"d": [3, 4, 5]}, "the emptied folders are removed"
    assert cache.usage() == {"disk_bytes": 3 * one_file, "disk_budget_bytes": 3 * one_file, "files": 3,
                             "memory_bytes": cache.bytes_in_memory}
    assert cache.missing("d", range(6)) == [0, 1, 2]


def test_the_folder_never_holds_more_than_the_disk_budget(tmp_path):
    one_file, folder = slice_file_bytes(tmp_path), tmp_path / "cache"
    peaks = []

    class Watched(Settled):
        def _write(self, key, s, tensor):
            size = super()._write(key, s, tensor)  # the new file is in place, nothing evicted since
            peaks.append(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()))
            return size

    cache = Watched(ONE_SLICE, folder, disk_budget_bytes=3 * one_file)
    for key in "abcd":
        cache.get(key, [0, 1], CountingEncoder())
    assert len(peaks) == 8 and max(peaks) <= 3 * one_file, f"{max(peaks)} bytes on disk, budget {3 * one_file}"


def test_memory_hits_count_as_use(tmp_path):
    one_file, folder = slice_file_bytes(tmp_path), tmp_path / "cache"
    cache = Settled(1 << 20, folder, disk_budget_bytes=3 * one_file)
    enc = CountingEncoder()
    cache.get("vol", [0, 1, 2], enc)
    cache.get("vol", [0], enc)  # from memory
    cache.get("vol", [3], enc)
    assert on_disk(folder) == {"vol": [0, 2, 3]}


def test_a_restart_sees_the_files_and_their_order(tmp_path):
    one_file, folder = slice_file_bytes(tmp_path), tmp_path / "cache"
    Settled(1 << 20, folder).get("vol", [0, 1, 2, 3], CountingEncoder())
    for when, s in enumerate([2, 0, 3, 1]):  # used last: 2 longest ago, 1 most recently
        os.utime(folder / "vol" / f"{s:05d}.npy", (1000 + when, 1000 + when))
    restarted = Settled(1 << 20, folder, disk_budget_bytes=3 * one_file)
    assert on_disk(folder) == {"vol": [0, 1, 3]}, "the budget holds from the start"
    assert restarted.usage()["disk_bytes"] == 3 * one_file and restarted.usage()["files"] == 3
    restarted.get("other", [0], CountingEncoder())
    assert on_disk(folder) == {"other": [0], "vol": [1, 3]}


def test_slices_of_a_request_over_the_budget_are_returned_whole(tmp_path, caplog):
    one_file, folder = slice_file_bytes(tmp_path), tmp_path / "cache"
    cache = Settled(ONE_SLICE, folder, disk_budget_bytes=2 * one_file)  # memory holds one slice
    enc = CountingEncoder()
    cache.get("old", [0], enc)
    with caplog.at_level(logging.WARNING):
        out = cache.get("vol", [0, 1, 2, 3], enc)
        cache.get("vol", [4, 5, 6, 7], enc)
    assert [int(e[0, 0, 0]) for e in out] == [0, 1, 2, 3] and out.shape == (4, 4, 2, 2)
    assert enc.calls == [[0], [0, 1, 2, 3], [4, 5, 6, 7]], "read back from disk, not embedded again"
    assert caplog.text.count("over the") == 1, "warned once"
    assert on_disk(folder) == {"vol": [4, 5, 6, 7]}, "kept until the next write"
    cache.get("vol", [8], enc)
    assert on_disk(folder) == {"vol": [7, 8]}


def test_usage_without_a_disk_budget(tmp_path):
    Settled(1 << 20, tmp_path).get("vol", [0, 1], CountingEncoder())
    cache = EmbeddingCache(1 << 20, tmp_path)
    files = list(tmp_path.rglob("*.npy"))
    assert cache.usage() == {"disk_bytes": sum(f.stat().st_size for f in files), "disk_budget_bytes": None,
                             "files": 2, "memory_bytes": 0}
    assert EmbeddingCache(1 << 20).usage()["files"] == 0


def test_retain_deletes_the_slices_of_other_volumes_only(tmp_path):
    cache = Settled(1 << 20, tmp_path)
    for key in ("aaaa-ax2-lite", "aaaa-ax2-lite-at0_0_32x32", "bbbb-ax2-lite", "cccc-ax0-lite"):
        cache.get(key, [1, 2], CountingEncoder())
    assert cache.retain({"aaaa", "cccc"}) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aaaa-ax2-lite", "aaaa-ax2-lite-at0_0_32x32", "cccc-ax0-lite"]
    assert cache.usage()["files"] == 6
    enc = CountingEncoder()
    cache.get("bbbb-ax2-lite", [1], enc)
    assert enc.calls == [[1]], "a deleted slice is embedded again when asked for"
    restarted = EmbeddingCache(1 << 20, tmp_path)
    assert restarted.retain(set()) == 7 and not list(tmp_path.iterdir())


class HeldWriter(EmbeddingCache):
    """Its writer waits for ``release`` before each file."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def _write(self, key, s, tensor):
        assert self.release.wait(10), "never released"
        return super()._write(key, s, tensor)


def test_slices_waiting_for_the_writer_are_served_and_not_embedded_again(tmp_path):
    cache, enc = HeldWriter(1 << 20, tmp_path), CountingEncoder()
    cache.get("vol", [0, 1], enc)
    assert cache.missing("vol", [0, 1, 2]) == [2] and not list(tmp_path.rglob("*.npy")), "pending, not written"
    out = cache.get("vol", [1, 0, 2], enc)
    assert enc.calls == [[0, 1], [2]] and [int(e[0, 0, 0]) for e in out] == [1, 0, 2]
    cache.release.set()
    cache.flush()
    cache.flush()  # idempotent
    assert on_disk(tmp_path) == {"vol": [0, 1, 2]}
    assert np.array_equal(np.load(tmp_path / "vol" / "00001.npy"), np.full((4, 2, 2), 1, np.float16))
    assert cache.usage()["files"] == 3 and cache.usage()["memory_bytes"] == 3 * ONE_SLICE


def test_queued_writes_keep_the_disk_budget(tmp_path):
    one_file, folder = slice_file_bytes(tmp_path), tmp_path / "cache"
    cache, enc = EmbeddingCache(ONE_SLICE, folder, disk_budget_bytes=3 * one_file), CountingEncoder()
    for s in range(20):
        cache.put("vol", [s], enc([s]))
    cache.flush()
    assert on_disk(folder) == {"vol": [17, 18, 19]}
    assert cache.usage()["disk_bytes"] == sum(f.stat().st_size for f in folder.rglob("*.npy")) == 3 * one_file
    assert not list(folder.rglob("*.tmp"))


def test_a_slice_that_cannot_be_written_is_served_from_memory(tmp_path, caplog):
    (tmp_path / "vol").write_bytes(b"")  # a file where the key's folder goes
    cache, enc = EmbeddingCache(1 << 20, tmp_path), CountingEncoder()
    with caplog.at_level(logging.WARNING):
        cache.get("vol", [0], enc)
        cache.flush()
    assert "could not persist embedding" in caplog.text and cache.usage()["files"] == 0
    assert int(cache.get("vol", [0], enc)[0, 0, 0, 0]) == 0 and enc.calls == [[0]]


def test_the_writer_logs_a_failure_and_goes_on(tmp_path, caplog, monkeypatch):
    cache, enc = EmbeddingCache(1 << 20, tmp_path), CountingEncoder()
    monkeypatch.setattr(cache, "_write", lambda *args: 1 / 0)
    with caplog.at_level(logging.ERROR):
        cache.get("vol", [0], enc)
        cache.flush()
    assert "could not store 1 slice(s) of vol" in caplog.text and "ZeroDivisionError" in caplog.text
    monkeypatch.undo()
    cache.get("vol", [0, 1], enc)
    cache.flush()
    assert enc.calls == [[0], [0, 1]], "the failed slice is embedded again"
    assert on_disk(tmp_path) == {"vol": [0, 1]}


def test_retain_leaves_no_files_of_volumes_with_queued_writes(tmp_path):
    cache, enc = EmbeddingCache(1 << 20, tmp_path), CountingEncoder()
    for key in ("aaaa-ax2-lite", "bbbb-ax2-lite"):
        cache.get(key, list(range(8)), enc)
    assert cache.retain({"aaaa"}) == 8
    cache.flush()
    assert on_disk(tmp_path) == {"aaaa-ax2-lite": list(range(8))}
    assert cache.missing("bbbb-ax2-lite", [0, 7]) == [0, 7]


def test_a_put_waits_while_the_writer_is_behind_by_more_than_the_pending_budget(tmp_path):
    cache, enc = HeldWriter(1 << 20, tmp_path, pending_budget_bytes=ONE_SLICE), CountingEncoder()
    cache.put("vol", [0], enc([0]))  # an empty queue takes any put
    second = threading.Thread(target=cache.put, args=("vol", [1], enc([1])))
    second.start()
    second.join(0.3)
    assert second.is_alive() and cache.missing("vol", [0, 1]) == [1], "waits for the writer"
    cache.release.set()
    second.join(10)
    cache.flush()
    assert not second.is_alive() and on_disk(tmp_path) == {"vol": [0, 1]}
