"""Block reconstruction after RepQ-ViT (``--recon``): learned weight rounding, block by block.

Starting from the calibrated, reparameterized detector, each Swin block and patch merging, then the
FPN neck as one block, in turn (in forward order) learns the rounding of its weights (quant/adaround.py)
so that its quantized output, fed the *quantized* model's input to the block, matches the *float* model's output of the block on the
calibration images (BRECQ's target, QDrop's input). During the learning, every activation quantizer of
the block passes each element unquantized with probability ``drop_prob`` (QDrop) and lets gradients
through (straight-through). Steps, zero points, log-sqrt2 quantizers, BN folding and padding are not
touched; at the end each weight is written as ``scale * (code - zp)`` of its hard codes, and biases are
snapped to the int32 grid again. The result is ordinary quantization state: the exporter, parity and a
saved quant.pth treat it like any other. A block whose hard rounding does not beat nearest rounding on
the calibration images keeps nearest rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from repq_export.hooks import hooked
from repq_export.quant.adaround import SoftRounding, write_hard_weight
from repq_export.quant.integer_bias import snap_biases
from repq_export.quant.layers import QuantConv2d, QuantLinear, named_quantizers, set_quant_enabled
from repq_export.quant.recon_settings import ReconSettings


@dataclass(frozen=True)
class UnitResult:
    """One reconstructed block: its mean squared output error against float, before and after, and time."""

    name: str
    mse_before: float  # nearest rounding (RepQ-ViT), on the quantized model's input
    mse_after: float  # learned rounding (equal to before where the block kept nearest rounding)
    kept_nearest: bool
    seconds: float


class _Stop(Exception):
    """Raised by a capture hook to end a forward once the block of interest has run."""


def recon_units(detector: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The backbone's Swin blocks and patch mergings, then the FPN neck, in forward order, with their names."""
    for i, layer in enumerate(detector.backbone.layers):
        for j, block in enumerate(layer.blocks):
            yield f"backbone.layers.{i}.blocks.{j}", block
        if layer.downsample is not None:
            yield f"backbone.layers.{i}.downsample", layer.downsample
    yield "neck", detector.neck


def _detach(value: Any) -> Any:
    """``value`` with every tensor in it (a tensor, or a tuple / list of them) detached."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def _tensors(value: Any) -> list[Tensor]:
    """The tensors of a block output: one tensor, or the maps of a tuple (the FPN's levels)."""
    return [value] if isinstance(value, Tensor) else [v for v in value if isinstance(v, Tensor)]


def _squared_error(out: Any, target: Any) -> tuple[Tensor, int]:
    """(sum of squared differences over every output tensor, number of elements)."""
    pairs = list(zip(_tensors(out), _tensors(target)))
    return sum((o - t).pow(2).sum() for o, t in pairs), sum(t.numel() for _, t in pairs)


def _loss(out: Any, target: Any) -> Tensor:
    """Reconstruction loss: squared error summed over channels, averaged over positions (and levels)."""
    terms = [(o - t).pow(2).sum(1 if o.dim() == 4 else -1).mean() for o, t in zip(_tensors(out), _tensors(target))]
    return sum(terms) / len(terms)


@torch.no_grad()
def capture(model: nn.Module, unit: nn.Module, inputs: Sequence[tuple[Tensor, Tensor]]) -> list[tuple[tuple, Any]]:
    """(positional args, output) of ``unit`` in one forward of ``model`` per image (stopped after ``unit``)."""
    records: list[tuple[tuple, Any]] = []

    def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        records.append((_detach(tuple(args)), _detach(out)))
        raise _Stop

    with hooked([(unit, hook)]):
        for img, img_hw in inputs:
            try:
                model(img, img_hw)
            except _Stop:
                pass
    if len(records) != len(inputs):
        raise RuntimeError("reconstruction: a calibration forward did not reach the block")
    return records


def _activation_quantizers(unit: nn.Module) -> list[nn.Module]:
    return [q for name, q in named_quantizers(unit) if not name.endswith("weight_quantizer")]


def _layers(unit: nn.Module) -> list[tuple[str, QuantLinear | QuantConv2d]]:
    return [(n, m) for n, m in unit.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def _mse(unit: nn.Module, records: Sequence[tuple[tuple, Any]], targets: Sequence[Any]) -> float:
    """Mean squared error of ``unit``'s quantized output against the float targets, over all images."""
    total, count = 0.0, 0
    with torch.no_grad():
        for (args, _), target in zip(records, targets):
            error, n = _squared_error(unit(*args), target)
            total, count = total + float(error), count + n
    return total / count


def reconstruct_unit(unit: nn.Module, records: Sequence[tuple[tuple, Any]], targets: Sequence[Any],
                     settings: ReconSettings, generator: torch.Generator,
                     bar: tqdm | None = None) -> tuple[float, float, bool]:
    """Learn the rounding of ``unit``'s weights in place; returns (mse before, mse after, kept nearest)."""
    layers = _layers(unit)
    before = _mse(unit, records, targets)
    roundings = {name: SoftRounding(layer.weight, layer.weight_quantizer) for name, layer in layers}
    saved = {name: layer.weight.detach().clone() for name, layer in layers}
    params = [p for r in roundings.values() for p in r.parameters()]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    p = settings.drop_prob

    def drop(q: nn.Module, args: tuple, out: Tensor) -> Tensor:
        """QDrop with a straight-through gradient: forward value quantized or not, per element."""
        x = args[0]
        keep_float = (torch.rand(out.shape, generator=generator) < p).to(out.device)  # CPU draws: same on any device
        return x + (torch.where(keep_float, x, out) - x).detach()

    warm = int(settings.warmup * settings.iters)
    frozen = [q for q in unit.parameters() if q.requires_grad]
    for q in frozen:  # only the rounding variables learn
        q.requires_grad_(False)
    for _, layer in layers:
        layer.weight_quantizer.enabled = False
    try:
        with hooked((q, drop) for q in _activation_quantizers(unit)):
            for step in range(settings.iters):
                index = int(torch.randint(len(records), (1,), generator=generator))
                weights = {f"{name}.weight": r.soft_weight() for name, r in roundings.items()}
                out = functional_call(unit, weights, records[index][0])
                loss = _loss(out, targets[index])
                if step >= warm:
                    progress = (step - warm) / max(1, settings.iters - warm)
                    beta = settings.beta_end + (settings.beta_start - settings.beta_end) * (1 - progress)
                    loss = loss + settings.round_weight * sum(r.regularizer(beta) for r in roundings.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if bar is not None:
                    bar.update(1)
    finally:
        for _, layer in layers:
            layer.weight_quantizer.enabled = True
        for q in frozen:
            q.requires_grad_(True)
    for name, layer in layers:
        write_hard_weight(layer, roundings[name])
    after = _mse(unit, records, targets)
    if after >= before:  # never worse than RepQ-ViT's nearest rounding on the calibration images
        with torch.no_grad():
            for name, layer in layers:
                layer.weight.copy_(saved[name])
        return before, before, True
    return before, after, False


def reconstruct(detector: nn.Module, inputs: Sequence[tuple[Tensor, Tensor]], settings: ReconSettings,
                progress: bool = True, log: Callable[[str], None] | None = None) -> list[UnitResult]:
    """Learn the weight rounding of every backbone block of a quantized ``detector`` in place, on ``inputs``
    (``(img, img_hw)`` pairs), and record ``settings`` in its ``quant_settings``."""
    quant_settings = getattr(detector, "quant_settings", None)
    if quant_settings is None:
        raise ValueError("reconstruct: the detector has not been quantized")
    if settings.iters < 1 or not inputs:
        raise ValueError("reconstruct: needs at least one iteration and one image")
    settings = dataclasses.replace(settings, images=len(inputs))
    detector.eval()
    reference = copy.deepcopy(detector)
    set_quant_enabled(reference, False)  # the float function (reparameterization preserves it)
    reference_units = dict(reference.named_modules())
    generator = torch.Generator().manual_seed(settings.seed)
    units = list(recon_units(detector))
    if log is not None:
        log(f"reconstructing {len(units)} blocks, {settings.iters} steps each, on {len(inputs)} image(s), "
            f"seed {settings.seed}")
    results = []
    with tqdm(total=len(units) * settings.iters, desc="reconstructing", unit="step", disable=not progress) as bar:
        for name, unit in units:
            start = time.perf_counter()
            targets = [out for _, out in capture(reference, reference_units[name], inputs)]
            records = capture(detector, unit, inputs)
            before, after, kept = reconstruct_unit(unit, records, targets, settings, generator, bar)
            results.append(UnitResult(name, before, after, kept, time.perf_counter() - start))
            if log is not None:
                log(f"  {name}: output MSE vs float {before:.4g} -> {after:.4g}"
                    f"{' (kept nearest rounding)' if kept else ''}, {results[-1].seconds:.1f} s")
    if quant_settings.integer_bias:
        snap_biases(detector)
    detector.quant_settings = dataclasses.replace(quant_settings, reconstruction=settings)
    if log is not None:
        log(f"reconstruction took {sum(r.seconds for r in results):.0f} s")
    return results
