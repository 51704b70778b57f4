"""Anchor generation: mmdet 2.11 base anchors (centre 0, no rounding) and grid order."""

import math

import pytest
import torch

from repq_export.errors import UserError
from repq_export.models.anchors import AnchorGenerator, base_anchors

S2 = math.sqrt(2.0)


def test_base_anchors_stride4_scale8_hand_values():
    # base 4, scale 8 -> area 32^2; ratio r = h / w: w = 32 / sqrt(r), h = 32 * sqrt(r)
    expected = torch.tensor(
        [
            [-16 * S2, -8 * S2, 16 * S2, 8 * S2],  # ratio 0.5: 45.25 x 22.63
            [-16.0, -16.0, 16.0, 16.0],  # ratio 1
            [-8 * S2, -16 * S2, 8 * S2, 16 * S2],  # ratio 2: 22.63 x 45.25
        ]
    )
    got = base_anchors(4, [8], [0.5, 1.0, 2.0])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert got[0, 0].item() == pytest.approx(-22.627417, abs=1e-5)


def test_base_anchors_are_ratio_major():
    got = base_anchors(16, [1, 2], [1.0, 4.0])
    sizes = (got[:, 2] - got[:, 0]).tolist(), (got[:, 3] - got[:, 1]).tolist()
    # (ratio 1, scale 1), (ratio 1, scale 2), (ratio 4, scale 1), (ratio 4, scale 2)
    assert sizes[0] == pytest.approx([16, 32, 8, 16])
    assert sizes[1] == pytest.approx([16, 32, 32, 64])


def test_grid_order_is_y_x_anchor_and_shift_is_stride():
    gen = AnchorGenerator(strides=[4, 8], ratios=[0.5, 1.0, 2.0], scales=[8])
    level0, level1 = gen.grid_anchors([(2, 3), (1, 2)])
    assert level0.shape == (2 * 3 * 3, 4) and level1.shape == (1 * 2 * 3, 4)
    # cell (y=1, x=2), anchor 1 (ratio 1) -> index (1 * 3 + 2) * 3 + 1
    torch.testing.assert_close(level0[16], torch.tensor([-16.0 + 8, -16.0 + 4, 16.0 + 8, 16.0 + 4]))
    # level 1 base size 8: ratio-1 anchor is 64 x 64; cell (0, 1) shifts x by 8
    torch.testing.assert_close(level1[4], torch.tensor([-32.0 + 8, -32.0, 32.0 + 8, 32.0]))
    assert gen.num_base_anchors == 3 and gen.num_levels == 2


def test_generator_has_no_state_dict_keys():
    assert AnchorGenerator().state_dict() == {}


def test_bad_configuration_raises_user_error():
    with pytest.raises(UserError):
        AnchorGenerator(strides=[4, 8], base_sizes=[4])
    with pytest.raises(UserError):
        AnchorGenerator().grid_anchors([(2, 2)])
