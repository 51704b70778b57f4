"""The noise-floor spread: its range over samples and the 'backend within the floor' rule."""

from repq_export.evaluation.noise_floor import NoiseFloor, NoiseFloorSpread, sample_direction
from repq_export.evaluation.parity import DetectionSummary


def floor(sample: int, matched: int, bbox: float, segm: float) -> NoiseFloor:
    return NoiseFloor(sample, 50, DetectionSummary(images=1, ref=100, got=100, matched=matched), bbox, segm)


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
