"""Block reconstruction after RepQ-ViT (``--recon``): learned weight rounding and activation steps, block by block.

Starting from the calibrated, reparameterized detector, each unit of quant/recon_units.py (Swin blocks,
patch mergings, the FPN, then the RPN head and the RoI box and mask heads) in turn, in forward order,
learns the rounding of its weights (quant/adaround.py) and the steps of its per-tensor uniform activation
quantizers (quant/learned_step.py, zero points and bits fixed), so that its quantized output, fed the
*quantized* model's input to the unit (QDrop's input), matches the float target (the float model's
output of the unit; for the RoI heads, the float head on the same RoI features). While learning, every
activation quantizer of the unit passes each element unquantized with probability ``drop_prob`` (QDrop).
Log-sqrt2 quantizers, zero points, BN folding and padding are not touched; at the end each weight is
written as ``scale * (code - zp)`` of its hard codes, each learned step into its quantizer, and biases are
snapped to the int32 grid again. The result is ordinary quantization state: the exporter, parity and a
saved quant.pth treat it like any other. A unit whose result does not beat its RepQ-ViT state on the
calibration images keeps that state.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
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
from repq_export.quant.learned_step import LearnedStep, learnable
from repq_export.quant.recon_settings import GptqSettings, ReconSettings
from repq_export.quant.recon_units import ReconUnit, recon_units


@dataclass(frozen=True)
class UnitResult:
    """One reconstructed unit: its mean squared output error against float, before and after, and time."""

    name: str
    mse_before: float  # RepQ-ViT's state, on the quantized model's input
    mse_after: float  # learned state (equal to before where the unit kept RepQ-ViT's state)
    kept_nearest: bool
    seconds: float


class _Stop(Exception):
    """Raised by a capture hook to end a forward once the unit of interest has run."""


class _Runner(nn.Module):
    """A unit and its run function as one module, so that ``functional_call`` can swap its weights."""

    def __init__(self, unit: ReconUnit) -> None:
        super().__init__()
        self.unit = unit.module
        self.fn = unit.run

    def forward(self, *args: Any) -> Any:
        return self.fn(self.unit, *args)


def _detach(value: Any) -> Any:
    """``value`` with every tensor in it (a tensor, or a tuple / list of them) detached."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def _tensors(value: Any) -> list[Tensor]:
    """The tensors of a unit output: one tensor, or a tuple / list of them (FPN levels, head outputs)."""
    return [value] if isinstance(value, Tensor) else [v for v in value if isinstance(v, Tensor)]


def _squared_error(out: Any, target: Any) -> tuple[Tensor, int]:
    """(sum of squared differences over every output tensor, number of elements)."""
    pairs = list(zip(_tensors(out), _tensors(target)))
    return sum((o - t).pow(2).sum() for o, t in pairs), sum(t.numel() for _, t in pairs)


def _channel_dim(t: Tensor) -> int:
    return 1 if t.dim() == 4 else -1


def _loss(out: Any, target: Any, pooled: bool = False) -> Tensor:
    """Reconstruction loss: squared error summed over channels, averaged over positions, then over the outputs
    (each map weighs the same) or, ``pooled``, over the positions of all outputs (each position weighs the same)."""
    sums = [(o - t).pow(2).sum(_channel_dim(o)) for o, t in zip(_tensors(out), _tensors(target))]
    if pooled:
        return sum(e.sum() for e in sums) / sum(e.numel() for e in sums)
    return sum(e.mean() for e in sums) / len(sums)


def _split(args_list: Sequence[tuple], targets: Sequence[Any], holdout: float
           ) -> tuple[list[tuple], list[Any], list[tuple], list[Any]]:
    """(learning args, targets, judging args, targets): every k-th image judges (k = 1 / holdout) when
    ``holdout`` > 0 and both parts get an image; otherwise all images both learn and judge."""
    k = round(1 / holdout) if holdout > 0 else 0
    judge = [i for i in range(len(args_list)) if k and i % k == k - 1]
    learn = [i for i in range(len(args_list)) if i not in judge]
    if not judge or not learn:
        return list(args_list), list(targets), list(args_list), list(targets)
    pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
    return pick(args_list, learn), pick(targets, learn), pick(args_list, judge), pick(targets, judge)


@torch.no_grad()
def correct_biases(unit: ReconUnit, args_list: Sequence[tuple], targets: Sequence[Any]) -> int:
    """Add to each output layer's bias the per-channel mean of (float target - quantized output) over the
    images and positions (pooled over the outputs a layer drives); returns how many biases moved."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for args, target in zip(args_list, targets):
        for name, o, t in zip(unit.out_layers, _tensors(unit.run(unit.module, *args)), _tensors(target)):
            if name is None:
                continue
            dim = _channel_dim(o)
            diff = (t - o).movedim(dim, -1).reshape(-1, o.shape[dim])
            sums[name] = sums.get(name, 0) + diff.sum(0)
            counts[name] = counts.get(name, 0) + diff.shape[0]
    modules = dict(unit.module.named_modules())
    moved = 0
    for name, total in sums.items():
        bias = modules[name].bias
        if bias is not None and counts[name]:
            bias.add_((total / counts[name]).to(bias.dtype))
            moved += 1
    return moved


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


def _mse(runner: nn.Module, args_list: Sequence[tuple], targets: Sequence[Any]) -> float:
    """Mean squared error of the unit's quantized output against the float targets, over all images."""
    total, count = 0.0, 0
    with torch.no_grad():
        for args, target in zip(args_list, targets):
            error, n = _squared_error(runner(*args), target)
            total, count = total + float(error), count + n
    return total / max(count, 1)


def _annealed_beta(settings: ReconSettings, step: int, warm: int) -> float:
    progress = (step - warm) / max(1, settings.iters - warm)
    return settings.beta_end + (settings.beta_start - settings.beta_end) * (1 - progress)


def reconstruct_unit(unit: ReconUnit, args_list: Sequence[tuple], targets: Sequence[Any], settings: ReconSettings,
                     generator: torch.Generator, bar: tqdm | None = None) -> tuple[float, float, bool]:
    """Learn ``unit``'s weight rounding and activation steps in place; returns (mse before, mse after, kept)."""
    runner = _Runner(unit)
    layers = _layers(unit.module)
    args_list, targets, judge_args, judge_targets = _split(args_list, targets, settings.holdout)
    before = _mse(runner, judge_args, judge_targets)
    saved = {k: v.detach().clone() for k, v in unit.module.state_dict().items()}
    roundings = {name: SoftRounding(layer.weight, layer.weight_quantizer) for name, layer in layers}
    quantizers = _activation_quantizers(unit.module)
    steps = {id(q): LearnedStep(q) for q in quantizers if settings.step_lr > 0 and learnable(q)}
    groups = [{"params": [p for r in roundings.values() for p in r.parameters()], "lr": settings.lr}]
    if steps:
        groups.append({"params": [s.log_scale for s in steps.values()], "lr": settings.step_lr})
    optimizer = torch.optim.Adam(groups)
    p = settings.drop_prob

    def drop(q: nn.Module, args: tuple, out: Tensor) -> Tensor:
        """QDrop: each element quantized (with the learned step where there is one) or passed as is."""
        x = args[0]
        keep_float = (torch.rand(out.shape, generator=generator) < p).to(out.device)  # CPU draws: same on any device
        learned = steps.get(id(q))
        if learned is not None:
            return torch.where(keep_float, x, learned(x))
        return x + (torch.where(keep_float, x, out) - x).detach()  # straight-through

    warm = int(settings.warmup * settings.iters)
    frozen = [t for t in unit.module.parameters() if t.requires_grad]
    for t in frozen:  # only the rounding variables and the steps learn
        t.requires_grad_(False)
    for _, layer in layers:
        layer.weight_quantizer.enabled = False
    try:
        with hooked((q, drop) for q in quantizers):
            for step in range(settings.iters):
                picks = torch.randint(len(args_list), (settings.images_per_step,), generator=generator).tolist()
                weights = {f"unit.{name}.weight": r.soft_weight() for name, r in roundings.items()}
                loss = sum(_loss(functional_call(runner, weights, args_list[i]), targets[i], settings.pooled)
                           for i in picks) / len(picks)
                if step >= warm and roundings:
                    beta = _annealed_beta(settings, step, warm)
                    loss = loss + settings.round_weight * sum(r.regularizer(beta) for r in roundings.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if bar is not None:
                    bar.update(1)
    finally:
        for _, layer in layers:
            layer.weight_quantizer.enabled = True
        for t in frozen:
            t.requires_grad_(True)
    for name, layer in layers:
        write_hard_weight(layer, roundings[name])
    for q in quantizers:
        if id(q) in steps:
            steps[id(q)].write(q)
    if settings.bias_correction:
        correct_biases(unit, args_list, targets)
    after = _mse(runner, judge_args, judge_targets)
    if not after < before:  # never worse than RepQ-ViT's state on the judging images
        unit.module.load_state_dict(saved)
        return before, before, True
    return before, after, False


def _non_empty(records: Sequence[tuple[tuple, Any]], targets: Sequence[Any]) -> tuple[list[tuple], list[Any]]:
    """The (args, target) pairs whose target holds any element (a mask head on an image without boxes has none)."""
    kept = [(args, t) for (args, _), t in zip(records, targets) if all(x.numel() for x in _tensors(t))]
    return [a for a, _ in kept], [t for _, t in kept]


def unit_data(unit: ReconUnit, detector: nn.Module, reference: nn.Module, inputs: Sequence[tuple[Tensor, Tensor]]
              ) -> tuple[list[tuple], list[Any]]:
    """The unit's captured arguments in the quantized ``detector`` and its float targets (``reference``)."""
    records = capture(detector, unit.module, inputs)
    float_unit = dict(reference.named_modules())[unit.name]
    with torch.no_grad():
        if unit.float_chain:
            chain = capture(reference, float_unit, inputs)
            plain = unit.run is ReconUnit.run  # the unit's own forward: its captured output is the target
            targets = [out if plain else unit.run(float_unit, *args) for args, out in chain]
        else:
            targets = [unit.run(float_unit, *args) for args, _ in records]
    return _non_empty(records, [_detach(t) for t in targets])


def reconstruct(detector: nn.Module, inputs: Sequence[tuple[Tensor, Tensor]], settings: ReconSettings | GptqSettings,
                progress: bool = True, log: Callable[[str], None] | None = None,
                skip: Callable[[str], bool] = lambda name: False) -> list[UnitResult]:
    """Learn the weight rounding and activation steps of every unit of a quantized ``detector`` in place, on
    ``inputs`` (``(img, img_hw)`` pairs), and record ``settings`` in its ``quant_settings``; units whose name
    ``skip`` accepts keep their RepQ-ViT state (an ablation of the study tool). GptqSettings round the
    weights by GPTQ instead (quant/gptq.py; no per-unit results)."""
    if isinstance(settings, GptqSettings):  # closed-form rounding instead of learning (quant/gptq.py)
        from repq_export.quant.gptq import round_weights

        round_weights(detector, inputs, settings, progress, log)
        return []
    quant_settings = getattr(detector, "quant_settings", None)
    if quant_settings is None:
        raise ValueError("reconstruct: the detector has not been quantized")
    if settings.iters < 1 or not inputs:
        raise ValueError("reconstruct: needs at least one iteration and one image")
    settings = dataclasses.replace(settings, images=len(inputs))
    detector.eval()
    reference = copy.deepcopy(detector)
    set_quant_enabled(reference, False)  # the float function (reparameterization preserves it)
    generator = torch.Generator().manual_seed(settings.seed)
    units = [u for u in recon_units(detector, settings.heads, settings.mask_probs) if not skip(u.name)]
    if log is not None:
        log(f"reconstructing {len(units)} blocks, {settings.iters} steps each, on {len(inputs)} image(s), "
            f"seed {settings.seed}")
    results = []
    with tqdm(total=len(units) * settings.iters, desc="reconstructing", unit="step", disable=not progress) as bar:
        for unit in units:
            start = time.perf_counter()
            args_list, targets = unit_data(unit, detector, reference, inputs)
            if not args_list:
                before = after = float("nan")
                kept = True
                bar.update(settings.iters)
            else:
                before, after, kept = reconstruct_unit(unit, args_list, targets, settings, generator, bar)
            results.append(UnitResult(unit.name, before, after, kept, time.perf_counter() - start))
            if log is not None:
                log(f"  {unit.name}: output MSE vs float {before:.4g} -> {after:.4g}"
                    f"{' (kept RepQ-ViT state)' if kept else ''}, {results[-1].seconds:.1f} s")
    if quant_settings.integer_bias:
        snap_biases(detector)
    detector.quant_settings = dataclasses.replace(quant_settings, reconstruction=settings)
    if log is not None:
        log(f"reconstruction took {sum(r.seconds for r in results):.0f} s")
    return results
