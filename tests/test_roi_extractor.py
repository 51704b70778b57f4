"""RoI level mapping at the boundaries, and multi-level RoIAlign against per-level roi_align."""

import torch
from torchvision.ops import roi_align

from repq_export.models.roi_extractor import MultiLevelRoIAlign, map_roi_levels


def _square(side: float) -> list[float]:
    return [10.0, 10.0, 10.0 + side, 10.0 + side]


def test_level_mapping_boundaries():
    # level = floor(log2(sqrt(w h) / 56 + 1e-6)) clamped to [0, 3]: 112, 224, 448 open new levels
    boxes = torch.tensor(
        [_square(s) for s in (1.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 2000.0)]
        + [[0.0, 0.0, 56.0, 224.0]]  # sqrt(56 * 224) = 112 -> level 1
        + [[0.0, 0.0, 0.0, 50.0]]  # zero area -> log2(1e-6) < 0 -> level 0
    )
    assert map_roi_levels(boxes, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 1, 0]
    assert map_roi_levels(boxes, 2).tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0]


def test_extractor_matches_roi_align_on_each_boxes_level():
    g = torch.Generator().manual_seed(0)
    strides = (4, 8, 16, 32)
    feats = [torch.randn(1, 3, 256 // s, 320 // s, generator=g) for s in strides]
    boxes = torch.tensor([_square(50.0), [5.0, 7.0, 260.0, 240.0], [0.0, 0.0, 500.0, 480.0], _square(120.0)])
    ext = MultiLevelRoIAlign(7, strides)
    out = ext(feats, boxes)
    assert out.shape == (4, 3, 7, 7)
    levels = map_roi_levels(boxes, 4).tolist()
    assert levels == [0, 2, 3, 1]
    for i, lvl in enumerate(levels):
        rois = torch.cat([torch.zeros(1, 1), boxes[i : i + 1]], 1)
        ref = roi_align(feats[lvl], rois, (7, 7), 1.0 / strides[lvl], 0, aligned=True)
        torch.testing.assert_close(out[i : i + 1], ref, rtol=0, atol=0)
    # aligned RoIAlign of a constant map is that constant, on any level
    const = [torch.full_like(f, 2.5) for f in feats]
    torch.testing.assert_close(ext(const, boxes[:1]), torch.full((1, 3, 7, 7), 2.5))


def test_extractor_zero_boxes_and_no_parameters():
    ext = MultiLevelRoIAlign(14)
    feats = [torch.randn(1, 5, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    assert ext(feats, torch.zeros(0, 4)).shape == (0, 5, 14, 14)
    assert ext.state_dict() == {}


def test_box_inverted_by_rounding_maps_to_level_0():
    """x2 one ulp below x1 (a clipped zero-width box after float rounding) must not turn into NaN."""
    x = torch.tensor(300.0)
    below = torch.nextafter(x, torch.tensor(0.0)).item()
    boxes = torch.tensor([[300.0, 10.0, below, 200.0], [10.0, 10.0, 200.0, 200.0]])
    assert map_roi_levels(boxes, 4).tolist() == [0, 1]  # 190 px: between 112 and 224
    feats = [torch.randn(1, 2, 512 // s, 512 // s) for s in (4, 8, 16, 32)]
    assert MultiLevelRoIAlign(7)(feats, boxes).shape == (2, 2, 7, 7)
