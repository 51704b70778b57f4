"""Uniform asymmetric fake quantizer (RepQ-ViT ``UniformQuantizer``), with its state in buffers.

Fake-quant: ``(clamp(round(x / d) + zp, 0, 2^n - 1) - zp) * d`` (``torch.round``: half to even).
Initialisation (the reference's search): for ``pct`` in 0.999, 0.9999, 0.99999 take
``hi = quantile(x, pct)``, ``lo = quantile(x, 1 - pct)``, ``d = (hi - lo) / (2^n - 1)``,
``zp = round(-lo / d)``, and keep the candidate with the lowest mean squared error
``mean(|x - fq(x)|^2)`` (the reference's ``lp_loss(p=2, reduction='all')``, in float32; the
first candidate wins a tie). Per-channel does the same for every channel at once.

Departure: the reference divides by zero on a constant tensor or channel (hi == lo) and then
fails; here ``d`` is floored at ``MIN_SCALE``, so a constant c gets ``d = MIN_SCALE`` and
``zp = round(-c / MIN_SCALE)``, which reproduces c (exactly when c = 0). Note that, as in the
reference, ``zp`` lies outside [0, 2^n - 1] whenever the calibrated range excludes zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repq_export.quant.quantile import reference_quantiles

PERCENTILES = (0.999, 0.9999, 0.99999)
MIN_SCALE = 1e-8  # floor of d: only a constant (zero-range) tensor or channel reaches it


def uniform_codes(x: Tensor, scale: Tensor, zero_point: Tensor, n_bits: int) -> Tensor:
    """Unsigned integer codes ``clamp(round(x / scale) + zero_point, 0, 2^n - 1)`` as float."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2**n_bits - 1)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, n_bits: int) -> Tensor:
    """``(clamp(round(x / scale) + zero_point, 0, 2^n - 1) - zero_point) * scale``, broadcast as given."""
    return (uniform_codes(x, scale, zero_point, n_bits) - zero_point) * scale


def search_scale(rows: Tensor, n_bits: int) -> tuple[Tensor, Tensor]:
    """Best ``(scale, zero_point)``, each (R,), for every row of ``rows`` (R, M) by the reference's search."""
    rows = rows.detach().float()
    bounds = reference_quantiles(rows, [*PERCENTILES, *(1.0 - p for p in PERCENTILES)])
    his, los = bounds[: len(PERCENTILES)], bounds[len(PERCENTILES) :]
    scales = torch.clamp_min((his - los) / (2**n_bits - 1), MIN_SCALE)  # (K, R)
    zero_points = torch.round(-los / scales)
    errors = torch.stack(
        [
            (rows - fake_quant(rows, d[:, None], zp[:, None], n_bits)).abs().pow(2).mean(dim=1)
            for d, zp in zip(scales, zero_points)
        ]
    )
    best = torch.argmin(errors, dim=0, keepdim=True)  # first minimum, as the reference's strict '<'
    return scales.gather(0, best)[0], zero_points.gather(0, best)[0]


class UniformQuantizer(nn.Module):
    """Asymmetric uniform fake quantizer, per-tensor (``channel_axis=None``) or per-channel.

    Buffers (all saved in the state dict):
      ``scale`` float32, shape () per-tensor or (C,) per-channel, > 0;
      ``zero_point`` float32 holding integers (fractional only after the reference-mode
      reparameterization, ``integer_zero_point=False``), same shape as ``scale``;
      ``n_bits`` int64 shape (); ``initialized`` bool shape ().
    ``channel_axis``: None, 0 (weights: output channel) or -1 (activations: last dim).
    ``enabled`` False makes it the identity; with ``calibrating`` True an uninitialised quantizer
    initialises from the first non-empty input it sees (and leaves an empty one untouched).
    """

    def __init__(self, n_bits: int, channel_axis: int | None = None) -> None:
        super().__init__()
        if channel_axis not in (None, 0, -1):
            raise ValueError(f"UniformQuantizer: channel_axis must be None, 0 or -1, got {channel_axis}")
        self.channel_axis = channel_axis
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("n_bits", torch.tensor(int(n_bits), dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True
        self.calibrating = False

    @property
    def bits(self) -> int:
        return int(self.n_bits)

    @property
    def per_channel(self) -> bool:
        return self.channel_axis is not None

    def extra_repr(self) -> str:
        return f"n_bits={self.bits}, channel_axis={self.channel_axis}, initialized={bool(self.initialized)}"

    def initialize(self, x: Tensor) -> None:
        """Set ``scale`` and ``zero_point`` from ``x`` by the reference's percentile/MSE search."""
        x = x.detach()
        if self.channel_axis is None:
            rows = x.reshape(1, -1)
        else:
            rows = x.movedim(self.channel_axis, 0).reshape(x.shape[self.channel_axis], -1)
        scale, zero_point = search_scale(rows, self.bits)
        if self.channel_axis is None:
            scale, zero_point = scale[0], zero_point[0]
        self.set_params(scale, zero_point)

    def set_params(self, scale: Tensor, zero_point: Tensor) -> None:
        """Install a calibrated ``scale`` / ``zero_point`` (shape () per-tensor, (C,) per-channel)."""
        expected = 0 if self.channel_axis is None else 1
        if scale.dim() != expected or zero_point.shape != scale.shape:
            raise ValueError(
                f"UniformQuantizer: scale {tuple(scale.shape)} / zero_point {tuple(zero_point.shape)} "
                f"do not fit channel_axis={self.channel_axis}"
            )
        self.scale = scale.detach().to(torch.float32).clone()
        self.zero_point = zero_point.detach().to(torch.float32).clone()
        self.initialized.fill_(True)

    def make_per_tensor(self, scale: Tensor, zero_point: Tensor) -> None:
        """Turn into a per-tensor quantizer with the given 0-dim scale and zero point (reparameterization)."""
        self.channel_axis = None
        self.set_params(scale, zero_point)

    def _broadcast(self, t: Tensor, x: Tensor) -> Tensor:
        """``t`` shaped to broadcast against ``x`` along ``channel_axis``."""
        if self.channel_axis == 0:
            return t.reshape(-1, *([1] * (x.dim() - 1)))
        return t

    def codes(self, x: Tensor) -> Tensor:
        """Integer codes in [0, 2^n - 1] (float dtype) that the fake-quant output dequantizes."""
        return uniform_codes(x, self._broadcast(self.scale, x), self._broadcast(self.zero_point, x), self.bits)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            if not self.calibrating:
                raise RuntimeError("UniformQuantizer used before calibration (enable calibration mode first)")
            if x.numel() == 0:
                return x
            self.initialize(x)
        return fake_quant(x, self._broadcast(self.scale, x), self._broadcast(self.zero_point, x), self.bits)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Take the saved shapes of ``scale``/``zero_point`` (per-tensor or per-channel, C unknown before)."""
        for name in ("scale", "zero_point"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor):
                setattr(self, name, torch.empty(saved.shape, dtype=torch.float32, device=self.n_bits.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        expected = 0 if self.channel_axis is None else 1
        if self.scale.dim() != expected:
            errors.append(
                f"{prefix}scale: shape {tuple(self.scale.shape)} does not fit channel_axis={self.channel_axis}"
            )
