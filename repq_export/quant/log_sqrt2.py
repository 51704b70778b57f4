"""Log-sqrt2 fake quantizer for the softmax output (RepQ-ViT ``LogSqrt2Quantizer``).

Reference semantics: ``q = round(-2 * log2(x / d))``; output 0 where ``q >= 2^n`` (x = 0
included), else ``d * 2^(-q / 2)`` with ``q`` clamped at 0 (x > d gives d).

The code is DEFINED here by comparison with thresholds, so that an exact integer-free lowering
exists (Less/Greater ops or a bucketize): with ``t_k = d * 2^(-(k + 0.5) / 2)``, k = 0..2^n - 1,
``q = #{k : x < t_k}``. Each ``t_k`` is stored as the smallest float32 not below the exact real
boundary, so for float32 x the code is the exactly rounded ``-2 log2(x / d)`` (the boundaries are
irrational multiples of d, so no float32 x ties). The reference's float32 ``log2`` differs from
this only for x within a few ulp of a boundary.

Output values come from a (2^n + 1)-entry table: entry q is the reference's float32 expression
``2^(-ceil(q/2)) * (1 + (sqrt2 - 1) * (q mod 2)) * d`` for q < 2^n, and 0 for q = 2^n.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from repq_export.quant.quantile import reference_quantiles
from repq_export.quant.uniform import MIN_SCALE, PERCENTILES


def log_sqrt2_thresholds(scale: Tensor, n_bits: int) -> Tensor:
    """(2^n,) float32 boundaries ``t_k`` (decreasing): x >= t_k means code <= k."""
    d = float(scale)
    exact = np.array([d * 2.0 ** (-(k + 0.5) / 2) for k in range(2**n_bits)], dtype=np.float64)
    t = exact.astype(np.float32)
    t = np.where(t.astype(np.float64) < exact, np.nextafter(t, np.float32(np.inf)), t)
    return torch.from_numpy(t.astype(np.float32)).to(scale.device)


def log_sqrt2_codes(x: Tensor, scale: Tensor, n_bits: int) -> Tensor:
    """int64 codes in [0, 2^n]: ``#{k : x < t_k}``; code 2^n means output 0."""
    ascending = log_sqrt2_thresholds(scale, n_bits).flip(0).contiguous()
    return 2**n_bits - torch.bucketize(x.contiguous(), ascending, right=True)


def log_sqrt2_lut(scale: Tensor, n_bits: int) -> Tensor:
    """(2^n + 1,) float32 output value of each code (the reference's float32 arithmetic; last is 0)."""
    q = torch.arange(2**n_bits, dtype=torch.float32, device=scale.device)
    odd = (q % 2) * (math.sqrt(2) - 1) + 1
    values = 2 ** (-1 * torch.ceil(q / 2)) * odd * scale.to(torch.float32)
    return torch.cat([values, values.new_zeros(1)])


def log_sqrt2_fake_quant(x: Tensor, scale: Tensor, n_bits: int) -> Tensor:
    """Fake-quantized ``x``: the table value of its code."""
    return log_sqrt2_lut(scale, n_bits)[log_sqrt2_codes(x, scale, n_bits)].to(x.dtype)


def search_log_scale(x: Tensor, n_bits: int) -> Tensor:
    """0-dim scale d: the upper quantile (of 0.999, 0.9999, 0.99999) with the lowest MSE."""
    flat = x.detach().float().reshape(1, -1)
    candidates = torch.clamp_min(reference_quantiles(flat, PERCENTILES)[:, 0], MIN_SCALE)
    errors = torch.stack([(flat - log_sqrt2_fake_quant(flat, d, n_bits)).abs().pow(2).mean() for d in candidates])
    return candidates[torch.argmin(errors)]  # first minimum, as the reference's strict '<'


class LogSqrt2Quantizer(nn.Module):
    """Per-tensor log-sqrt2 fake quantizer (input A of ``attn @ v``).

    Buffers: ``scale`` float32 shape () (> 0), ``n_bits`` int64 shape (), ``initialized`` bool
    shape (). ``enabled`` / ``calibrating`` as for ``UniformQuantizer``.
    """

    def __init__(self, n_bits: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("n_bits", torch.tensor(int(n_bits), dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True
        self.calibrating = False

    @property
    def bits(self) -> int:
        return int(self.n_bits)

    def extra_repr(self) -> str:
        return f"n_bits={self.bits}, initialized={bool(self.initialized)}"

    def initialize(self, x: Tensor) -> None:
        """Set ``scale`` from ``x`` by the reference's percentile/MSE search."""
        self.scale = search_log_scale(x, self.bits).detach().clone()
        self.initialized.fill_(True)

    def thresholds(self) -> Tensor:
        return log_sqrt2_thresholds(self.scale, self.bits)

    def lut(self) -> Tensor:
        return log_sqrt2_lut(self.scale, self.bits)

    def codes(self, x: Tensor) -> Tensor:
        return log_sqrt2_codes(x, self.scale, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            if not self.calibrating:
                raise RuntimeError("LogSqrt2Quantizer used before calibration (enable calibration mode first)")
            if x.numel() == 0:
                return x
            self.initialize(x)
        return log_sqrt2_fake_quant(x, self.scale, self.bits)
