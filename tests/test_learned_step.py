"""The learned activation step (quant/learned_step.py): the quantizer's own fake quant at the start, LSQ's
gradient, and a write-back that leaves an ordinary per-tensor quantizer with its integer zero point."""

from __future__ import annotations

import pytest
import torch

from repq_export.quant.learned_step import LearnedStep, learnable
from repq_export.quant.uniform import UniformQuantizer


def calibrated(bits: int = 4, channel_axis: int | None = None, shift: float = 0.0) -> tuple[UniformQuantizer, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 50, 8, generator=g) * 3 + shift
    q = UniformQuantizer(bits, channel_axis)
    q.initialize(x)
    return q, x


def test_it_starts_as_the_quantizer_itself():
    for shift in (0.0, 10.0):  # the second one's calibrated range excludes zero: zp outside [0, 15]
        q, x = calibrated(shift=shift)
        step = LearnedStep(q)
        assert torch.equal(step(x), q(x))


def test_the_gradient_to_the_step_is_lsq():
    q, x = calibrated()
    step = LearnedStep(q)
    step(x).sum().backward()
    s, zp, qmax = q.scale, q.zero_point, 15
    ratio = x / s
    bound = torch.clamp(ratio, -zp, qmax - zp)  # LSQ: clipped where the unrounded x/s leaves the range
    ds = torch.where(bound == ratio, torch.round(ratio) - ratio, bound)  # d out / d s per element
    assert int((bound != ratio).sum()) > 0 and int((bound == ratio).sum()) > 0
    want = float((ds * s).sum())  # chain rule through s = exp(log_scale)
    assert step.log_scale.grad is not None
    assert float(step.log_scale.grad) == pytest.approx(want, rel=1e-4)


def test_learning_lowers_the_error_and_writes_a_quantizer_of_the_same_form():
    q, x = calibrated(bits=3)
    zero_point = q.zero_point.clone()
    start_error = float((q(x) - x).pow(2).mean())
    step = LearnedStep(q)
    step.log_scale.data += 0.7  # a poor start: the step twice too large
    optimizer = torch.optim.Adam([step.log_scale], lr=0.02)
    for _ in range(200):
        optimizer.zero_grad()
        (step(x) - x).pow(2).mean().backward()
        optimizer.step()
    step.write(q)
    assert q.channel_axis is None and q.scale.dim() == 0 and q.scale.dtype == torch.float32
    assert torch.equal(q.zero_point, zero_point)
    assert torch.equal(q(x), step(x).detach())  # the quantizer now computes what was learned
    assert float((q(x) - x).pow(2).mean()) < 1.05 * start_error  # recovered from twice the step


def test_only_calibrated_per_tensor_uniform_quantizers_with_integer_zero_points_learn():
    per_channel, _ = calibrated(channel_axis=-1)
    assert learnable(calibrated()[0]) and not learnable(per_channel) and not learnable(UniformQuantizer(4))
    with pytest.raises(ValueError, match="per-tensor"):
        LearnedStep(per_channel)
    fractional, _ = calibrated()
    fractional.set_params(fractional.scale, fractional.zero_point + 0.5)  # the reference mode's zero points
    assert not learnable(fractional)
