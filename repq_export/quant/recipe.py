"""The quantized structure of a detector, written once: settings and the steps that build it.

Quantizing applies the steps in order (calibration runs between the first and the second);
loading a saved state prepares the same steps on a float detector, so that its state dict then
fits the saved one. Both walk the one ``STEPS`` list, so the structure cannot be applied one way
and replayed another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from repq_export.quant.assign import check_bits, quantize_modules
from repq_export.quant.bn_fold import fold_batchnorms, prepare_folded_structure
from repq_export.quant.integer_bias import snap_biases
from repq_export.quant.recon_settings import GptqSettings, ReconSettings, settings_from_dict
from repq_export.quant.reparam import prepare_reparam_structure, reparameterize


@dataclass(frozen=True)
class QuantSettings:
    """How a detector is quantized: the recipe's parameters, recorded in every manifest."""

    w_bits: int
    a_bits: int
    reparam: bool = True
    integer_zero_point: bool = True  # round the reparameterized zero point (integer kernels need it)
    exact_padding: bool = True  # pad windows with the reparameterized zero, not 0
    calibration_tensor_sha256: tuple[str, ...] = field(default=())
    integer_bias: bool = True  # biases on the int32 grid of input step x weight step
    bn_folded: bool = True  # BatchNorm after a quantized conv folded into it
    reconstruction: ReconSettings | GptqSettings | None = None  # weight rounding after RepQ-ViT (--recon)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form both manifests (quant.pth's and repq.json's) carry."""
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "reparam": self.reparam,
                "integer_zero_point": self.integer_zero_point, "exact_padding": self.exact_padding,
                "integer_bias": self.integer_bias, "bn_folded": self.bn_folded,
                "calibration_tensor_sha256": list(self.calibration_tensor_sha256),
                **({"reconstruction": self.reconstruction.as_dict()} if self.reconstruction else {})}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> QuantSettings:
        """The inverse of ``as_dict``; ValueError naming the first bad field."""
        flags = {}
        for key in ("reparam", "integer_zero_point", "exact_padding", "integer_bias", "bn_folded"):
            value = raw.get(key, False) if key in ("integer_bias", "bn_folded") else raw[key]
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
            flags[key] = value
        sha = raw.get("calibration_tensor_sha256", ())
        if not isinstance(sha, (list, tuple)) or not all(isinstance(s, str) for s in sha):
            raise ValueError("calibration_tensor_sha256 must be a list of strings")
        recon = raw.get("reconstruction")
        return cls(w_bits=check_bits("w_bits", raw["w_bits"]), a_bits=check_bits("a_bits", raw["a_bits"]),
                   calibration_tensor_sha256=tuple(sha), **flags,
                   reconstruction=None if recon is None else settings_from_dict(recon))


@dataclass(frozen=True)
class Step:
    """One step of the quantized structure: when it runs, how it applies, how it prepares for loading."""

    name: str
    enabled: Callable[[QuantSettings], bool]
    apply: Callable[[nn.Module, QuantSettings], object]
    prepare: Callable[[nn.Module, QuantSettings], object]
    after_calibration: bool = True


def _always(settings: QuantSettings) -> bool:
    return True


def _quantize_modules(detector: nn.Module, s: QuantSettings) -> None:
    quantize_modules(detector, s.w_bits, s.a_bits)


def _nothing(detector: nn.Module, s: QuantSettings) -> None:
    """Biases on the int32 grid are values, not structure: a saved state loads as is."""


STEPS: tuple[Step, ...] = (
    # every conv / linear / attention matmul gets its quantizers (RepQ-ViT's assignment)
    Step("quantize modules", _always, _quantize_modules, _quantize_modules, after_calibration=False),
    # LayerNorm -> linear pairs: per-channel input steps folded into the LayerNorm and the weights
    Step("reparameterize", lambda s: s.reparam,
         lambda d, s: reparameterize(d, s.integer_zero_point, s.exact_padding),
         lambda d, s: prepare_reparam_structure(d, s.exact_padding)),
    # BatchNorm after a quantized conv: folded into its per-channel weight step and bias
    Step("fold BatchNorm", lambda s: s.bn_folded, lambda d, s: fold_batchnorms(d),
         lambda d, s: prepare_folded_structure(d)),
    # biases snapped to the int32 grid that integer kernels add them on
    Step("snap biases", lambda s: s.integer_bias, lambda d, s: snap_biases(d), _nothing),
)


def apply_steps(detector: nn.Module, settings: QuantSettings, after_calibration: bool) -> None:
    """Apply the enabled steps of one phase (before calibration, or after it) to `detector`."""
    for step in STEPS:
        if step.after_calibration == after_calibration and step.enabled(settings):
            step.apply(detector, settings)


def prepare_steps(detector: nn.Module, settings: QuantSettings) -> None:
    """Give a float `detector` the structure of a saved quantized one, so its state dict loads."""
    for step in STEPS:
        if step.enabled(settings):
            step.prepare(detector, settings)
