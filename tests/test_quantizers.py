"""Quantizers: hand-computed values, the vectorized search against a per-channel loop, and an
independent, literal re-implementation of the RepQ-ViT reference quantizers as the oracle."""

import math

import numpy as np
import pytest
import torch

from repq_export.quant.log_sqrt2 import (
    LogSqrt2Quantizer,
    log_sqrt2_codes,
    log_sqrt2_fake_quant,
    log_sqrt2_lut,
    log_sqrt2_thresholds,
)
from repq_export.quant.quantile import reference_quantiles
from repq_export.quant.uniform import MIN_SCALE, UniformQuantizer, fake_quant, search_scale

# ---------------------------------------------------------------------------------------------
# The reference, re-implemented literally from RepQ-ViT detection/tools/quant/quantizer.py
# semantics: per-channel = a Python loop over channels (last dim for 3-D activations, dim 0
# otherwise), torch.quantile per candidate, score = mean(|x - x_q|^2), strict '<' from 1e10.
# ---------------------------------------------------------------------------------------------


def ref_uniform_quantize(x, hi, lo, n_bits):
    delta = (hi - lo) / (2**n_bits - 1)
    zero_point = (-lo / delta).round()
    x_int = torch.round(x / delta)
    x_quant = torch.clamp(x_int + zero_point, 0, 2**n_bits - 1)
    return (x_quant - zero_point) * delta


def ref_uniform_init(x, n_bits, channel_wise):
    if channel_wise:
        n_channels = x.shape[-1] if x.dim() == 3 else x.shape[0]
        delta, zero_point = torch.zeros(n_channels), torch.zeros(n_channels)
        for c in range(n_channels):
            channel = x[:, :, c] if x.dim() == 3 else x[c]
            delta[c], zero_point[c] = ref_uniform_init(channel, n_bits, False)
        return delta, zero_point
    best, delta, zero_point = 1e10, None, None
    for pct in [0.999, 0.9999, 0.99999]:
        hi = torch.quantile(x.reshape(-1), pct)
        lo = torch.quantile(x.reshape(-1), 1.0 - pct)
        score = (x - ref_uniform_quantize(x, hi, lo, n_bits)).abs().pow(2).mean()
        if score < best:
            best = score
            delta = (hi - lo) / (2**n_bits - 1)
            zero_point = (-lo / delta).round()
    return delta, zero_point


def ref_log_quantize(x, delta, n_bits):
    x_int = torch.round(-1 * (x / delta).log2() * 2)
    mask = x_int >= 2**n_bits
    x_quant = torch.clamp(x_int, 0, 2**n_bits - 1)
    odd_mask = (x_quant % 2) * (math.sqrt(2) - 1) + 1
    out = 2 ** (-1 * torch.ceil(x_quant / 2)) * odd_mask * delta
    out[mask] = 0
    codes = torch.where(mask, torch.full_like(x_quant, 2**n_bits), x_quant)
    return out, codes.long()


def ref_log_init(x, n_bits):
    delta, best = x.max(), 1e10
    for pct in [0.999, 0.9999, 0.99999]:
        candidate = torch.quantile(x.reshape(-1), pct)
        score = (x - ref_log_quantize(x, candidate, n_bits)[0]).abs().pow(2).mean()
        if score < best:
            best, delta = score, candidate
    return delta


def softmax_maps(seed, shape=(6, 3, 49, 49)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * (1 + 4 * torch.rand((), generator=g))).softmax(-1)


# ---------------------------------------------------------------------------------------------
# Quantiles
# ---------------------------------------------------------------------------------------------


def test_quantiles_equal_torch_quantile_bitwise():
    g = torch.Generator().manual_seed(0)
    qs = [0.999, 0.9999, 0.99999, 1.0 - 0.999, 1.0 - 0.9999, 1.0 - 0.99999, 0.5]
    for trial in range(60):
        rows, m = 1 + trial % 4, int(torch.randint(1, 4000, (), generator=g))
        x = torch.randn(rows, m, generator=g) * 10
        if trial % 3 == 0:
            x = x.round()  # many equal values
        got = reference_quantiles(x, qs)
        want = torch.stack([torch.stack([torch.quantile(x[r], q) for r in range(rows)]) for q in qs])
        assert torch.equal(got, want), f"trial {trial}: rows {rows}, M {m}"


@pytest.mark.slow
def test_quantiles_equal_torch_quantile_above_2_pow_24():
    x = torch.randn(1, 2**24 + 1001, generator=torch.Generator().manual_seed(1)) ** 3
    qs = [0.999, 0.99999, 1.0 - 0.999, 1.0 - 0.99999]
    assert torch.equal(reference_quantiles(x, qs)[:, 0], torch.stack([torch.quantile(x[0], q) for q in qs]))


# ---------------------------------------------------------------------------------------------
# Uniform quantizer
# ---------------------------------------------------------------------------------------------


def test_uniform_fake_quant_hand_values_with_ties_and_clipping():
    # d = 0.5, zp = 2, 2 bits (codes 0..3): x/d = -2.5 -2 -1.5 -0.5 0.5 1.5 2 4
    x = torch.tensor([-1.25, -1.0, -0.75, -0.25, 0.25, 0.75, 1.0, 2.0])
    # round half to even: -2 -2 -2 -0 0 2 2 4; +2 -> 0 0 0 2 2 4 4 6; clamp -> 0 0 0 2 2 3 3 3
    want = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    assert torch.equal(fake_quant(x, torch.tensor(0.5), torch.tensor(2.0), 2), want)
    q = UniformQuantizer(2)
    q.set_params(torch.tensor(0.5), torch.tensor(2.0))
    assert torch.equal(q(x), want)
    assert q.codes(x).tolist() == [0, 0, 0, 2, 2, 3, 3, 3]


def test_uniform_init_hand_values():
    # 100 values at each extreme: every candidate percentile hits the extremes exactly,
    # so d = (3 - (-1)) / (2^2 - 1) and zp = round(1 / d) = round(0.75) = 1.
    x = torch.cat([torch.full((100,), -1.0), torch.linspace(-1, 3, 9800), torch.full((100,), 3.0)])
    q = UniformQuantizer(2)
    q.initialize(x.reshape(2, -1, 1))
    assert q.scale.shape == () and q.scale.item() == pytest.approx(4 / 3, rel=1e-7)
    assert q.zero_point.item() == 1.0


@pytest.mark.parametrize("outlier, winner", [(30.0, 0.999), (1000.0, 0.99999)])
def test_uniform_init_keeps_lowest_mse_candidate(outlier, winner):
    # five outliers among 100k normal values. At 30 the 0.99999 percentile lands on them and its
    # range wastes the levels (MSE 0.42 vs 0.051 for 0.999); at 1000 clipping them costs more
    # (MSE 49.7 vs 1.0), so the widest candidate wins.
    x = torch.cat([torch.randn(100_000, generator=torch.Generator().manual_seed(0)), torch.full((5,), outlier)])
    q = UniformQuantizer(4)
    q.initialize(x)
    lo = {p: torch.quantile(x, 1.0 - p) for p in (0.999, 0.9999, 0.99999)}
    d = {p: (torch.quantile(x, p) - lo[p]) / 15 for p in lo}
    errors = {p: (x - fake_quant(x, d[p], torch.round(-lo[p] / d[p]), 4)).pow(2).mean() for p in d}
    assert min(errors, key=errors.get) == winner
    assert d[0.99999] > 1.3 * d[0.999]
    assert torch.equal(q.scale, d[winner]) and torch.equal(q.zero_point, torch.round(-lo[winner] / d[winner]))


def test_uniform_negative_range_gives_zero_point_above_the_code_range():
    # [-3, -1] excludes zero: as in the reference, zp = round(3 / d) = 22 > 2^4 - 1.
    x = torch.cat([torch.full((100,), -3.0), torch.linspace(-3, -1, 9800), torch.full((100,), -1.0)])
    q = UniformQuantizer(4)
    q.initialize(x)
    d = torch.tensor(2.0) / 15
    assert torch.equal(q.scale, d) and q.zero_point.item() == 22.0
    # -1 / d = -7.4999995 -> -7; -7 + 22 = 15 (the top code); (15 - 22) * d
    assert q.codes(torch.tensor([-1.0, -3.0])).tolist() == [15.0, 0.0]
    assert torch.equal(q(torch.tensor([-1.0])), torch.tensor([-7.0]) * d)


def test_uniform_constant_tensor_and_channel_get_the_scale_floor():
    q = UniformQuantizer(4)
    q.initialize(torch.full((50,), 2.5))
    assert q.scale.item() == pytest.approx(MIN_SCALE) and torch.isfinite(q.zero_point)
    assert q(torch.full((3,), 2.5)).tolist() == pytest.approx([2.5] * 3, rel=1e-6)
    zeros = UniformQuantizer(4)
    zeros.initialize(torch.zeros(50))
    assert zeros.zero_point.item() == 0.0 and torch.equal(zeros(torch.zeros(3)), torch.zeros(3))
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    w[1] = -0.7  # a constant output channel
    per_channel = UniformQuantizer(4, channel_axis=0)
    per_channel.initialize(w)
    assert per_channel.scale[1].item() == pytest.approx(MIN_SCALE)
    assert per_channel.scale[0] > 1e-3 and per_channel.scale[2] > 1e-3
    assert torch.isfinite(per_channel(w)).all()
    assert per_channel(w)[1].tolist() == pytest.approx([-0.7] * 8, rel=1e-6)


@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_vectorized_search_equals_per_channel_loop(n_bits):
    g = torch.Generator().manual_seed(n_bits)
    rows = torch.randn(24, 700, generator=g) * torch.rand(24, 1, generator=g) * 3 + torch.randn(24, 1, generator=g)
    rows[5] = rows[5].round()  # a channel with ties
    rows[7] = 1.25  # a constant channel
    scale, zero_point = search_scale(rows, n_bits)
    for c in range(rows.shape[0]):
        s_c, z_c = search_scale(rows[c : c + 1], n_bits)
        assert torch.equal(scale[c], s_c[0]) and torch.equal(zero_point[c], z_c[0]), f"channel {c}"


@pytest.mark.parametrize(
    "shape, axis",
    [((16, 8, 3, 3), 0), ((32, 48), 0), ((2, 150, 24), -1), ((1, 3, 40, 56), None), ((4, 49, 96), None)],
)
@pytest.mark.parametrize("n_bits", [3, 4, 6])
def test_uniform_init_equals_reference_reimplementation(shape, axis, n_bits):
    g = torch.Generator().manual_seed(sum(shape) + n_bits)
    x = torch.randn(shape, generator=g)
    if axis == -1:  # LayerNorm-like outputs: per-channel offsets and spreads, a few outliers
        x = x * torch.rand(shape[-1], generator=g) * 2 + torch.randn(shape[-1], generator=g)
        x[0, :3] *= 8
    q = UniformQuantizer(n_bits, channel_axis=axis)
    q.initialize(x)
    delta, zero_point = ref_uniform_init(x, n_bits, channel_wise=axis is not None)
    assert torch.equal(q.scale, delta.reshape(q.scale.shape))
    assert torch.equal(q.zero_point, zero_point.reshape(q.scale.shape))


def test_per_channel_forward_broadcasts_along_its_axis():
    g = torch.Generator().manual_seed(3)
    act = UniformQuantizer(4, channel_axis=-1)
    x = torch.randn(2, 30, 5, generator=g) * torch.arange(1, 6)
    act.initialize(x)
    assert act.scale.shape == (5,)
    assert torch.equal(act(x), fake_quant(x, act.scale, act.zero_point, 4))
    wq = UniformQuantizer(4, channel_axis=0)
    w = torch.randn(6, 2, 3, 3, generator=g)
    wq.initialize(w)
    want = fake_quant(w, wq.scale.view(-1, 1, 1, 1), wq.zero_point.view(-1, 1, 1, 1), 4)
    assert wq.scale.shape == (6,) and torch.equal(wq(w), want)


def test_quantizer_switches():
    q = UniformQuantizer(4)
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.ones(3))
    q.calibrating = True
    assert q(torch.empty(0, 4)).shape == (0, 4) and not bool(q.initialized)  # empty input: stays uninitialised
    x = torch.randn(100)
    y = q(x)
    assert bool(q.initialized) and not torch.equal(x, y)
    q.enabled = False
    assert q(x) is x


# ---------------------------------------------------------------------------------------------
# Log-sqrt2 quantizer
# ---------------------------------------------------------------------------------------------


def test_log_sqrt2_hand_values():
    # d = 1, 2 bits: codes 0..3 -> 1, 2^-0.5, 2^-1, 2^-1.5; code 4 -> 0.
    # -2 log2(x): 2 -> -2 (code 0), 1 -> 0, 0.75 -> 0.83, 0.5 -> 2, 0.3 -> 3.47, 0.2 -> 4.64, 0 -> inf
    x = torch.tensor([2.0, 1.0, 0.75, 0.5, 0.3, 0.2, 0.0])
    d = torch.tensor(1.0)
    assert log_sqrt2_codes(x, d, 2).tolist() == [0, 0, 1, 2, 3, 4, 4]
    want = torch.tensor([1.0, 1.0, 2**-0.5, 0.5, 2**-1.5, 0.0, 0.0])
    assert torch.allclose(log_sqrt2_fake_quant(x, d, 2), want, rtol=1e-7, atol=0)
    t = log_sqrt2_thresholds(d, 2)
    assert t.tolist() == pytest.approx([2**-0.25, 2**-0.75, 2**-1.25, 2**-1.75], rel=1e-7)
    assert log_sqrt2_lut(d, 2).shape == (5,) and log_sqrt2_lut(d, 2)[-1] == 0


def test_log_sqrt2_thresholds_are_the_smallest_float32_above_the_exact_boundary():
    d = torch.tensor(0.8372)
    t = log_sqrt2_thresholds(d, 6).numpy()
    exact = np.array([float(d) * 2.0 ** (-(k + 0.5) / 2) for k in range(64)])
    below = np.nextafter(t, np.float32(0))
    assert (t.astype(np.float64) >= exact).all() and (below.astype(np.float64) < exact).all()


@pytest.mark.parametrize("n_bits", [2, 3, 4, 6, 8])
def test_log_sqrt2_codes_equal_reference_log2_formula(n_bits):
    x = softmax_maps(n_bits)
    q = LogSqrt2Quantizer(n_bits)
    q.initialize(x)
    ref_out, ref_codes = ref_log_quantize(x, q.scale, n_bits)
    mismatches = int((q.codes(x) != ref_codes).sum())
    print(f"log-sqrt2 {n_bits}-bit: {mismatches} code mismatches in {x.numel()} softmax values")
    assert mismatches <= x.numel() * 1e-5
    assert torch.equal(q.lut(), torch.cat([ref_log_quantize(q.lut()[:-1], q.scale, n_bits)[0], torch.zeros(1)]))
    same = q.codes(x) == ref_codes
    assert torch.equal(q(x)[same], ref_out[same])


def test_log_sqrt2_codes_at_boundaries_are_exact_and_reference_differs_only_there():
    d = torch.tensor(0.93)
    t = log_sqrt2_thresholds(d, 4)
    near = torch.stack([t, torch.nextafter(t, torch.tensor(0.0)), torch.nextafter(t, torch.tensor(1.0))]).flatten()
    codes = log_sqrt2_codes(near, d, 4)
    k = torch.arange(16)
    assert torch.equal(codes[:16], k) and torch.equal(codes[16:32], k + 1) and torch.equal(codes[32:], k)
    mismatches = int((codes != ref_log_quantize(near, d, 4)[1]).sum())
    print(f"log-sqrt2 at float32 neighbours of the 16 boundaries: {mismatches} of {near.numel()} differ from log2")
    assert mismatches < near.numel()


@pytest.mark.parametrize("n_bits", [3, 4, 6])
def test_log_sqrt2_init_equals_reference_reimplementation(n_bits):
    x = softmax_maps(10 + n_bits)
    q = LogSqrt2Quantizer(n_bits)
    q.initialize(x)
    assert torch.equal(q.scale, ref_log_init(x, n_bits))


def test_log_sqrt2_all_zero_input_does_not_give_zero_scale():
    q = LogSqrt2Quantizer(4)
    q.initialize(torch.zeros(100))
    assert q.scale.item() == pytest.approx(MIN_SCALE)
    assert torch.equal(q(torch.zeros(4)), torch.zeros(4))
