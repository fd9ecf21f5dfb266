"""Hot slabs: the last slabs of consecutive slices, kept for the next request."""

import torch

from lib.spd.method.hot_slabs import HotSlabs


def slab(first, count):
    return torch.arange(first, first + count).float()[:, None].repeat(1, 3)


def test_slices_held_by_a_slab_come_from_it_others_do_not():
    hot = HotSlabs(2)
    hot.put("a", [4, 5, 6, 7], slab(4, 4))
    assert torch.equal(hot.get("a", [5, 6]), slab(5, 2))
    assert hot.get("a", [5, 6]).data_ptr() == hot.get("a", [5]).data_ptr(), "consecutive slices: a view, no copy"
    assert torch.equal(hot.get("a", [4, 7]), torch.stack([slab(4, 1)[0], slab(7, 1)[0]]))
    assert hot.get("a", [3, 4]) is None and hot.get("a", [7, 8]) is None and hot.get("b", [5]) is None


def test_the_latest_slabs_are_kept_one_per_key():
    hot = HotSlabs(2)
    hot.put("a", [0, 1], slab(0, 2))
    hot.put("b", [0, 1], slab(10, 2))
    hot.put("a", [2, 3], slab(2, 2))  # replaces a's slab, keeps b's
    assert hot.get("a", [0]) is None and torch.equal(hot.get("a", [3]), slab(3, 1))
    assert torch.equal(hot.get("b", [1]), slab(11, 1))
    hot.put("c", [0], slab(20, 1))  # a third key: b's, the oldest, goes
    assert hot.get("b", [1]) is None and hot.get("a", [3]) is not None
    hot.put("d", [1, 3], slab(0, 2))  # not consecutive: not kept
    assert hot.get("d", [1]) is None and hot.get("c", [0]) is not None
    hot.clear()
    assert hot.get("a", [3]) is None


def test_slabs_are_kept_within_their_byte_budget():
    hot = HotSlabs(3, budget_bytes=slab(0, 5).nbytes)  # 5 slices' worth
    hot.put("a", [0, 1, 2], slab(0, 3))
    hot.put("b", [0, 1], slab(0, 2))
    assert hot.get("a", [0]) is not None and hot.get("b", [0]) is not None, "5 slices fit"
    hot.put("c", [0, 1], slab(0, 2))  # a's 3 slices no longer fit beside b's and c's
    assert hot.get("a", [0]) is None and hot.get("b", [1]) is not None and hot.get("c", [1]) is not None
    hot.put("d", list(range(6)), slab(0, 6))  # over the budget alone: not kept, the others stay
    assert hot.get("d", [0]) is None and hot.get("c", [1]) is not None
