"""Delta box coding: round trip, and hand-computed decodes with the dw/dh clamp and the clip."""

import math

import pytest
import torch

from repq_export.errors import UserError
from repq_export.models.box_coder import DeltaXYWHBoxCoder, clip_boxes


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 200], 1)
    xy = torch.rand(50, 2, generator=g) * 300
    targets = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 200], 1)
    coder = DeltaXYWHBoxCoder(stds=(0.1, 0.1, 0.2, 0.2))
    deltas = coder.encode(boxes, targets)
    torch.testing.assert_close(coder.decode(boxes, deltas), targets, rtol=0, atol=1e-3)
    assert coder.encode(boxes, boxes).abs().max().item() == 0.0


def test_decode_hand_values_with_clamp_and_clip():
    # roi centre (20, 40), size 20 x 40; image h=100, w=200
    roi = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    deltas = torch.tensor([[0.5, -0.25, 5.0, -0.3]])
    out = DeltaXYWHBoxCoder().decode(roi, deltas, torch.tensor([100.0, 200.0]))
    # dw 5.0 is clamped to |log(16/1000)|: width 20 * 62.5 = 1250 around x = 30 -> clipped to [0, 200]
    gh = 40 * math.exp(-0.3)
    expected = torch.tensor([[0.0, 30 - gh / 2, 200.0, 30 + gh / 2]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    assert out[0, 1].item() == pytest.approx(15.18364, abs=1e-4)


def test_decode_stds_class_specific_and_unclipped():
    roi = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    coder = DeltaXYWHBoxCoder(stds=(0.1, 0.1, 0.2, 0.2))
    # class 0: zeros (box unchanged); class 1: (0.1, -0.1, 0.1, 5.0) after the stds, dh clamped
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.5, 25.0]])
    out = coder.decode(roi, deltas)
    gw = 20 * math.exp(0.1)
    expected = torch.tensor(
        [[10.0, 20.0, 30.0, 60.0, 22 - gw / 2, 36 - 1250.0, 22 + gw / 2, 36 + 1250.0]]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-3)
    clipped = coder.decode(roi, deltas, torch.tensor([100.0, 50.0]))
    expected = torch.tensor([22 - gw / 2, 0.0, 22 + gw / 2, 100.0])
    torch.testing.assert_close(clipped[0, 4:], expected, rtol=0, atol=1e-4)


def test_decode_zero_boxes_keeps_shape():
    out = DeltaXYWHBoxCoder().decode(torch.zeros(0, 4), torch.zeros(0, 12), torch.tensor([10.0, 10.0]))
    assert out.shape == (0, 12)


def test_clip_boxes_x_by_width_y_by_height():
    boxes = torch.tensor([[-5.0, -5.0, 500.0, 500.0]])
    clipped = clip_boxes(boxes, torch.tensor([30.0, 40.0]))
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 40.0, 30.0]]))


def test_bad_coder_arguments_raise_user_error():
    with pytest.raises(UserError):
        DeltaXYWHBoxCoder(stds=(1.0, 1.0))
    with pytest.raises(UserError):
        DeltaXYWHBoxCoder(wh_ratio_clip=2.0)
