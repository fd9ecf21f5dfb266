"""The mask memo decodes only slices whose prompts changed, and returns what the decoder returned (masks and
predicted IoUs)."""

import numpy as np
import torch

from lib.spd.runtime import PromptBatch
from lib.spd.runtime.mask_memo import MaskMemo, pack_masks, unpack_masks


def fake_decoder(calls):
    def decode(rows, prompts):
        calls.append(list(rows))
        logits = np.full((len(rows), 8, 9), -1.0, dtype=np.float32)
        for n, (r0, c0, r1, c1) in enumerate(prompts.boxes.astype(int)):
            logits[n, r0:r1 + 1, c0:c1 + 1] = 1.0
        return torch.from_numpy(logits), prompts.boxes[:, 2] / 10  # a score that differs between slices
    return decode


def test_repeat_decodes_only_changed_slices():
    memo, calls = MaskMemo(), []
    boxes = np.array([[0, 0, 3, 3], [1, 1, 4, 4], [2, 2, 5, 5]], dtype=np.float32)
    first, first_iou = memo.masks("v", [10, 11, 12], PromptBatch(boxes=boxes), (8, 9), fake_decoder(calls))
    boxes2 = boxes.copy()
    boxes2[1] = [0, 0, 7, 8]
    second, second_iou = memo.masks("v", [10, 11, 12], PromptBatch(boxes=boxes2), (8, 9), fake_decoder(calls))
    assert calls == [[0, 1, 2], [1]]
    first, second = first.numpy(), second.numpy()
    assert (second[[0, 2]] == first[[0, 2]]).all() and second[1].all()
    assert first[0, :4, :4].all() and not first[0, 5:].any()
    assert np.allclose(first_iou, [0.3, 0.4, 0.5]) and np.allclose(second_iou, [0.3, 0.7, 0.5])


def test_other_volume_or_slice_is_not_confused():
    memo, calls = MaskMemo(), []
    boxes = np.array([[0, 0, 3, 3]], dtype=np.float32)
    memo.masks("v", [10], PromptBatch(boxes=boxes), (8, 9), fake_decoder(calls))
    memo.masks("w", [10], PromptBatch(boxes=boxes), (8, 9), fake_decoder(calls))
    memo.masks("v", [11], PromptBatch(boxes=boxes), (8, 9), fake_decoder(calls))
    assert len(calls) == 3


def test_capacity_is_bounded():
    memo, calls = MaskMemo(max_items=2), []
    for s in range(5):
        memo.masks("v", [s], PromptBatch(boxes=np.array([[0, 0, 1, 1]], dtype=np.float32)), (8, 9), fake_decoder(calls))
    assert len(memo._items) == 2


def test_dense_prior_change_on_one_slice_decodes_that_slice_only():
    memo, calls = MaskMemo(), []
    boxes = np.array([[1, 1, 3, 3]] * 3, dtype=np.float32)
    prior = np.random.default_rng(0).normal(size=(3, 8, 9)).astype(np.float32)
    memo.masks("v", [0, 1, 2], PromptBatch(boxes=boxes, mask_logits=prior), (8, 9), fake_decoder(calls))
    memo.masks("v", [0, 1, 2], PromptBatch(boxes=boxes, mask_logits=prior.copy()), (8, 9), fake_decoder(calls))
    changed = prior.copy()
    changed[1, 4, 4] += 1e-3
    memo.masks("v", [0, 1, 2], PromptBatch(boxes=boxes, mask_logits=changed), (8, 9), fake_decoder(calls))
    assert calls == [[0, 1, 2], [1]]


def test_packing_round_trips_masks_of_any_size():
    masks = torch.from_numpy(np.random.default_rng(1).random((3, 7, 9)) > 0.5)  # 63 pixels: not whole bytes
    packed = pack_masks(masks)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8)
    assert torch.equal(unpack_masks(packed, (7, 9)), masks)
    assert np.array_equal(packed.numpy(), np.packbits(masks.flatten(1).numpy(), axis=1))
