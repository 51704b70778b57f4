"""GPTQ weight rounding after RepQ-ViT (``--recon gptq``): closed-form, no learning.

Each quantized conv and linear keeps its RepQ-ViT grid (per-channel step and zero point); only
which code each weight takes changes. Column by column, a weight is rounded to the grid and its
rounding error is spread over the columns not yet rounded, through the inverse Hessian
``H = E[x x^T]`` of the layer's quantized inputs, so that the layer's output on the calibration
images moves as little as the grid allows (Frantar et al., "GPTQ", 2022; Hassibi and Stork's
optimal brain surgeon). The result is ordinary fake-quant state: weights that the weight
quantizer reproduces exactly, which every exporter and backend takes unchanged.

Why by hand: the maintained GPTQ code (auto-gptq, optimum, llm-compressor) targets the linears of
language models with its own packed formats and its own grids; here the grid is RepQ-ViT's
quantizer, convolutions are unfolded to matrices, and the output must stay this project's state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from repq_export.hooks import hooked
from repq_export.quant.bn_fold import FOLDED_FLOAT_WEIGHT
from repq_export.quant.layers import QuantConv2d, QuantLinear
from repq_export.quant.recon_settings import GptqSettings
from repq_export.quant.uniform import fake_quant

QuantWeightLayer = QuantConv2d | QuantLinear


@dataclass(frozen=True)
class LayerResult:
    """One layer's weighted output error ``tr((W - Q) H (W - Q)^T)`` with nearest rounding and with GPTQ's."""

    name: str
    rows: int  # input rows (positions x images) its Hessian was gathered from; 0: the layer saw no input
    nearest: float
    gptq: float


def input_rows(layer: QuantWeightLayer, x: Tensor) -> Tensor:
    """The layer's quantized inputs as float64 rows (N, fan_in), in its weight's column order."""
    x = layer.input_quantizer(x).detach().double()
    if isinstance(layer, QuantConv2d):
        if layer.groups != 1:
            raise ValueError("gptq: grouped convolutions are not supported")
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, fan_in, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def input_hessians(model: nn.Module, layers: Sequence[QuantWeightLayer],
                   inputs: Sequence[tuple[Tensor, Tensor]]) -> list[tuple[Tensor | None, int]]:
    """Per layer, ``(mean of x x^T over its input rows, row count)`` from one pass of ``model`` over
    ``inputs`` (``(None, 0)`` for a layer that saw no input, e.g. a mask head on an image without boxes)."""
    sums: list[list] = [[None, 0] for _ in layers]

    def gather(acc: list) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            rows = input_rows(module, args[0])
            if rows.shape[0]:
                acc[0] = rows.T @ rows if acc[0] is None else acc[0] + rows.T @ rows
                acc[1] += rows.shape[0]
        return hook

    with hooked([(layer, gather(acc)) for layer, acc in zip(layers, sums)]), torch.no_grad():
        for img, img_hw in inputs:
            model(img, img_hw)
    return [(h / n if n else None, n) for h, n in sums]


def gptq_weights(weight: Tensor, scale: Tensor, zero_point: Tensor, bits: int, hessian: Tensor,
                 settings: GptqSettings) -> Tensor:
    """The (out, fan_in) ``weight`` rounded to its per-row grid (``scale``, ``zero_point``: (out,)) by GPTQ
    against ``hessian`` (fan_in, fan_in); float64, every entry a grid value."""
    w = weight.detach().double().clone()
    s, zp = scale.double().reshape(-1, 1), zero_point.double().reshape(-1, 1)
    h = hessian.clone()
    dead = torch.diag(h) == 0  # inputs that never vary: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += settings.damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    # upper Cholesky factor of H^-1: row i holds how column i's error moves the columns after it
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for start in range(0, w.shape[1], settings.block):
        end = min(start + settings.block, w.shape[1])
        block, errors, hb = w[:, start:end].clone(), torch.zeros_like(w[:, start:end]), hinv[start:end, start:end]
        for i in range(end - start):
            col = block[:, i:i + 1]
            rounded = fake_quant(col, s, zp, bits)
            q[:, start + i:start + i + 1] = rounded
            err = (col - rounded) / hb[i, i]
            block[:, i:] -= err @ hb[i:i + 1, i:]
            errors[:, i:i + 1] = err
        w[:, end:] -= errors @ hinv[start:end, end:]  # the block's errors onto the later columns at once
    return q


def output_error(weight: Tensor, rounded: Tensor, hessian: Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the mean squared change of the layer's output over its input rows."""
    d = weight.double() - rounded
    return float(torch.einsum("oi,ij,oj->", d, hessian, d))


def float_weight(layer: QuantWeightLayer) -> Tensor:
    """The float weight GPTQ rounds: the layer's own, or for a conv with BatchNorm folded into it (whose
    weight already holds its codes times the folded step) the float conv's weight times BN's factor,
    which the fold kept (quant/bn_fold.py); a folded state reloaded from quant.pth has only its codes."""
    return getattr(layer, FOLDED_FLOAT_WEIGHT, layer.weight).detach()


def weight_layers(model: nn.Module) -> list[tuple[str, QuantWeightLayer]]:
    """The quantized convs and linears whose weight quantizer is on, in module order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_quantizer.enabled]


def round_weights(detector: nn.Module, inputs: Sequence[tuple[Tensor, Tensor]], settings: GptqSettings,
                  progress: bool = True, log: Callable[[str], None] | None = None) -> list[LayerResult]:
    """Round every weight of a quantized ``detector`` by GPTQ in place, on ``inputs`` (``(img, img_hw)``
    pairs), ``settings.group`` layers per pass over the images (later groups see the earlier ones rounded),
    and record ``settings`` in its ``quant_settings``. Steps, zero points and biases stay as they were."""
    quant_settings = getattr(detector, "quant_settings", None)
    if quant_settings is None:
        raise ValueError("gptq: the detector has not been quantized")
    if not inputs:
        raise ValueError("gptq: needs at least one image")
    settings = dataclasses.replace(settings, images=len(inputs))
    detector.eval()
    layers = weight_layers(detector)
    if log is not None:
        log(f"GPTQ rounding of {len(layers)} layers on {len(inputs)} image(s), {settings.group} layers per pass")
    start, results = time.perf_counter(), []
    for first in tqdm(range(0, len(layers), settings.group), desc="GPTQ", unit="pass", disable=not progress):
        group = layers[first:first + settings.group]
        for (name, layer), (hessian, rows) in zip(group, input_hessians(detector, [m for _, m in group], inputs)):
            if hessian is None:
                results.append(LayerResult(name, 0, float("nan"), float("nan")))
                continue
            q = layer.weight_quantizer
            weight = float_weight(layer).reshape(layer.weight.shape[0], -1)
            nearest = fake_quant(weight.double(), q.scale.double().reshape(-1, 1),
                                 q.zero_point.double().reshape(-1, 1), q.bits)
            rounded = gptq_weights(weight, q.scale, q.zero_point, q.bits, hessian, settings)
            results.append(LayerResult(name, rows, output_error(weight, nearest, hessian),
                                       output_error(weight, rounded, hessian)))
            with torch.no_grad():  # a grid value times a float32 step: exact in float32
                layer.weight.copy_(rounded.reshape(layer.weight.shape).to(layer.weight.dtype))
    detector.quant_settings = dataclasses.replace(quant_settings, reconstruction=settings)
    if log is not None:
        done = [r for r in results if r.rows]
        ratio = sum(r.gptq for r in done) / max(sum(r.nearest for r in done), 1e-30)
        log(f"GPTQ took {time.perf_counter() - start:.0f} s; weighted output error {ratio:.2f}x of nearest "
            f"rounding over {len(done)} layers")
    return results
