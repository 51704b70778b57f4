"""The noise-floor spread: its range over samples and the 'backend within the floor' rule."""

import math

import torch

from repq_export.evaluation.noise_floor import (NoiseFloor, NoiseFloorSpread, move_ulps, sample_direction, step_of,
                                               ulp_steps)
from repq_export.evaluation.parity import CodeReport, DetectionSummary, add_float_difference


def floor(sample: int, matched: int, bbox: float, segm: float) -> NoiseFloor:
    return NoiseFloor(sample, 1.0, False, 50, DetectionSummary(images=1, ref=100, got=100, matched=matched), bbox, segm)


SPREAD = NoiseFloorSpread([floor(0, 95, -0.004, 0.001), floor(1, 93, 0.002, -0.003), floor(2, 96, 0.0, 0.0)])


def test_spread_range():
    assert SPREAD.lowest_match_rate() == 0.93
    assert SPREAD.largest_delta("bbox") == 0.004 and SPREAD.largest_delta("segm") == 0.003
    assert [sample_direction(s) for s in range(4)] == ["up", "down", "random", "random"]


def test_backend_within_floor_only_when_every_figure_is():
    assert SPREAD.contains(0.93, 0.004, -0.003)
    assert SPREAD.contains(0.94, -0.001, 0.002)
    assert not SPREAD.contains(0.92, 0.0, 0.0)  # fewer matched than the worst sample
    assert not SPREAD.contains(0.99, -0.005, 0.0)  # box AP moved more than any sample
    assert not SPREAD.contains(0.99, 0.0, 0.0031)  # mask AP moved more than any sample


def test_tolerances_widen_a_floor_that_never_moved():
    still = NoiseFloorSpread([floor(0, 100, 0.0, 0.0)])
    assert not still.contains(0.995, 0.0005, 0.0)
    assert still.contains(0.995, 0.0005, 0.0, min_match_rate=0.99, ap_tolerance=0.001)


def test_move_ulps_equals_repeated_nextafter():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=gen) * torch.exp(4 * torch.randn(20000, generator=gen))
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 2e-45, 1.0, -1.0])])  # zero crossings, exponent edges
    for k in (1, 3, 17):
        up, down = x, x
        for _ in range(k):
            up = torch.nextafter(up, torch.full_like(x, math.inf))
            down = torch.nextafter(down, torch.full_like(x, -math.inf))
        assert torch.equal(move_ulps(x, torch.full(x.shape, k)), up)
        assert torch.equal(move_ulps(x, torch.full(x.shape, -k)), down)


def test_float_difference_counts_values_and_equivalent_ulps():
    x = torch.tensor([1.0, 1.25, 1.5, 1.75])  # one binade: ulp 2^-23 each
    moved = torch.tensor([0, 2, 2, -2])
    report = CodeReport("call", "uniform")
    add_float_difference(report, x.numpy(), move_ulps(x, moved).numpy())
    assert (report.float_values, report.float_differ) == (4, 3)
    assert report.float_abs_diff / report.float_ulp_sum == 1.5  # 6 ulps moved over 4 values


def test_fractional_steps_average_the_step_and_unmeasured_quantizers_take_the_mean():
    gen = torch.Generator().manual_seed(0)
    steps = ulp_steps(torch.Size([100000]), 0.25, "random", gen)
    assert set(steps.unique().tolist()) == {-1, 0, 1}
    assert abs(steps.abs().float().mean().item() - 0.25) < 0.01 and abs(steps.float().mean().item()) < 0.01
    assert torch.equal(ulp_steps(torch.Size([3]), 2.0, "down", gen), torch.tensor([-2, -2, -2]))
    measured = {"a.input_quantizer": 0.5, "b.input_quantizer": 1.5}
    assert step_of("a.input_quantizer", measured) == 0.5 and step_of("roi_head.x", measured) == 1.0
    assert step_of("anything", 3.0) == 3.0
