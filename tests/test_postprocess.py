"""postprocess: boxes back to original pixels, mmdet-exact mask pasting, RLE."""
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F

from repq_export.data.postprocess import paste_mask, postprocess
from repq_export.data.transforms import preprocess


@pytest.fixture
def prep_x2():
    """A 100x150 image resized by exactly 2 (to 200x300)."""
    prep = preprocess(np.zeros((100, 150, 3), np.uint8), scale=(300, 200))
    assert prep.img_hw == (200, 300)
    np.testing.assert_array_equal(prep.scale_factor, np.full(4, 2, np.float32))
    return prep


def box_pixels(hw, x0, y0, x1, y1):
    m = np.zeros(hw, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_ones_mask_fills_exactly_the_box(prep_x2):
    boxes = torch.tensor([[20.0, 40.0, 132.0, 100.0]])  # resized pixels -> (10, 20, 66, 50)
    scores, labels, ones = torch.tensor([0.9]), torch.tensor([3]), torch.ones(1, 28, 28)
    dets = postprocess(boxes, scores, labels, ones, prep_x2, keep_binary=True)
    np.testing.assert_array_equal(dets.boxes, [[10, 20, 66, 50]])
    assert dets.binary_masks.shape == (1, 100, 150)
    np.testing.assert_array_equal(dets.binary_masks[0], box_pixels((100, 150), 10, 20, 66, 50))
    assert dets.scores.dtype == np.float32 and dets.labels.dtype == np.int64 and dets.labels[0] == 3


def test_left_half_mask_fills_the_left_half(prep_x2):
    half = torch.zeros(1, 28, 28)
    half[:, :, :14] = 1
    boxes = torch.tensor([[20.0, 40.0, 132.0, 100.0]])
    dets = postprocess(boxes, [0.5], [0], half, prep_x2, keep_binary=True)
    np.testing.assert_array_equal(dets.binary_masks[0], box_pixels((100, 150), 10, 20, 38, 50))


def test_fractional_box_keeps_pixels_whose_centres_are_inside():
    prep = preprocess(np.zeros((64, 64, 3), np.uint8), scale=(64, 64))  # no resize
    boxes = np.array([[10.3, 20.7, 40.2, 33.9]])  # numpy input, as from onnxruntime
    dets = postprocess(boxes, [1.0], [0], np.ones((1, 28, 28)), prep, keep_binary=True)
    # centres c + 0.5 in [10.3, 40.2] -> c = 10..39; r + 0.5 in [20.7, 33.9] -> r = 21..33
    np.testing.assert_array_equal(dets.binary_masks[0], box_pixels((64, 64), 10, 21, 40, 34))


def full_image_paste(mask, box, hw):
    """mmdet's GPU path (skip_empty=False): sample every pixel of the image."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(hw[0], dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    xs = (torch.arange(hw[1], dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    grid = torch.stack([xs[None, :].expand(hw), ys[:, None].expand(hw)], dim=2)
    return F.grid_sample(mask[None, None], grid[None], align_corners=False)[0, 0]


def test_cropped_paste_equals_full_image_sampling():
    torch.manual_seed(0)
    hw = (90, 120)
    for _ in range(20):
        x0, y0 = torch.rand(2) * torch.tensor([100.0, 70.0])
        box = torch.stack([x0, y0, x0 + 1 + torch.rand(()) * 60, y0 + 1 + torch.rand(()) * 50])
        box = torch.minimum(box, torch.tensor([120.0, 90.0, 120.0, 90.0]))
        mask = torch.rand(28, 28)
        probs, region = paste_mask(mask, box, hw)
        full = full_image_paste(mask, box, hw)
        assert torch.equal(probs, full[region])
        outside = torch.ones(hw, dtype=torch.bool)
        outside[region] = False
        assert not (full[outside] >= 0.5).any()  # the crop loses no foreground pixel


def test_rle_round_trip_and_json(prep_x2):
    torch.manual_seed(1)
    masks = torch.rand(3, 28, 28)
    boxes = torch.tensor([[0, 0, 300, 200], [50, 60, 90, 180], [100.5, 10.25, 250.75, 66.5]])
    labels = torch.tensor([0, 1, 2])
    dets = postprocess(boxes, torch.rand(3), labels, masks, prep_x2, keep_binary=True)
    assert len(dets) == 3 and len(dets.masks) == 3
    for rle, binary in zip(dets.masks, dets.binary_masks):
        assert isinstance(rle["counts"], str) and rle["size"] == [100, 150]
        np.testing.assert_array_equal(mask_util.decode(rle).astype(bool), binary)
        assert binary.any()
    json.dumps(dets.masks)


def test_threshold_is_inclusive():
    prep = preprocess(np.zeros((32, 32, 3), np.uint8), scale=(32, 32))
    mask = torch.full((1, 28, 28), 0.5)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    dets = postprocess(boxes, [1.0], [0], mask, prep, keep_binary=True)
    assert dets.binary_masks[0, 1:-1, 1:-1].all()  # 0.5 >= 0.5 away from the box border


def test_empty_detections(prep_x2):
    labels = torch.zeros(0, dtype=torch.int64)
    dets = postprocess(torch.zeros(0, 4), torch.zeros(0), labels, torch.zeros(0, 28, 28), prep_x2)
    assert len(dets) == 0 and dets.boxes.shape == (0, 4)
    assert dets.masks == [] and dets.binary_masks is None
