"""RepQ-ViT scale reparameterization of (LayerNorm -> next linear) pairs in the Swin backbone.

For the pairs ``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1`` and ``downsample.norm ->
downsample.reduction``, with the linear's calibrated per-channel input scale ``s`` and zero point
``z``: ``s~ = mean(s)``, ``z~ = mean(z)``, ``r = s / s~``, ``b = -z*s / r - (-z~ * s~)``; then
``gamma /= r``, ``beta = beta / r - b``, ``W *= r`` (input columns), ``bias += W @ b`` (a bias is
created if missing), the input quantizer becomes per-tensor ``(s~, z~)`` and the linear's
weight quantizer is re-initialised from the new weights. The per-channel grid of channel c maps
exactly onto the per-tensor grid, whatever ``z~`` is, and the float function is unchanged.

Departures from the reference (switchable, so that the reference can still be measured):
- ``integer_zero_point=True``: ``z~ = round(mean(z))``, which an integer kernel can use;
- ``exact_padding=True``: the SwinBlock pads the token map after norm1 with ``pad_value = -b``,
  the value that zero had before, instead of zeros, so the reparameterization stays exactly
  output-preserving when the map is not a window multiple.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from repq_export.quant.layers import QuantLinear


@dataclass
class ReparamPair:
    """A LayerNorm, the quantized linear it feeds, and the SwinBlock whose padding follows it (norm1)."""

    name: str
    norm: nn.LayerNorm
    linear: QuantLinear
    block: nn.Module | None


def reparam_pairs(detector: nn.Module) -> list[ReparamPair]:
    """All pairs of ``detector.backbone.layers`` in module order."""
    pairs = []
    for i, layer in enumerate(detector.backbone.layers):
        for j, block in enumerate(layer.blocks):
            prefix = f"backbone.layers.{i}.blocks.{j}"
            pairs.append(ReparamPair(f"{prefix}.norm1", block.norm1, block.attn.qkv, block))
            pairs.append(ReparamPair(f"{prefix}.norm2", block.norm2, block.mlp.fc1, None))
        if layer.downsample is not None:
            down = layer.downsample
            pairs.append(ReparamPair(f"backbone.layers.{i}.downsample.norm", down.norm, down.reduction, None))
    for p in pairs:
        if not isinstance(p.linear, QuantLinear):
            raise ValueError(f"reparam: {p.name} does not feed a quantized linear (run quantize_modules first)")
    return pairs


@torch.no_grad()
def reparameterize(detector: nn.Module, integer_zero_point: bool = True, exact_padding: bool = True) -> None:
    """Reparameterize every pair in place (their input quantizers must be calibrated per-channel)."""
    for pair in reparam_pairs(detector):
        reparameterize_pair(pair, integer_zero_point, exact_padding)


@torch.no_grad()
def reparameterize_pair(pair: ReparamPair, integer_zero_point: bool, exact_padding: bool) -> None:
    """Fold the per-channel input scales of ``pair.linear`` into ``pair.norm`` (see module docstring)."""
    q = pair.linear.input_quantizer
    if q.channel_axis is None or not bool(q.initialized):
        raise ValueError(f"reparam: {pair.name}: the next linear's input quantizer is not calibrated per-channel")
    s, z = q.scale, q.zero_point
    s_t, z_t = s.mean(), z.mean()
    if integer_zero_point:
        z_t = torch.round(z_t)
    r = s / s_t
    b = (-z * s) / r - (-z_t * s_t)
    pair.norm.weight.data = pair.norm.weight.data / r
    pair.norm.bias.data = pair.norm.bias.data / r - b
    linear = pair.linear
    linear.weight.data = linear.weight.data * r
    shift = torch.mm(linear.weight.data, b.reshape(-1, 1)).reshape(-1)
    if linear.bias is None:
        linear.bias = nn.Parameter(shift)
    else:
        linear.bias.data = linear.bias.data + shift
    q.make_per_tensor(s_t, z_t)
    linear.weight_quantizer.initialize(linear.weight)
    if exact_padding and pair.block is not None:
        pair.block.pad_value = (-b).clone()


def prepare_reparam_structure(detector: nn.Module, exact_padding: bool = True) -> None:
    """Give a freshly quantized (uncalibrated) detector the shape of a reparameterized one.

    Per-tensor input quantizers, a bias on every paired linear and (``exact_padding``) a
    ``pad_value`` on every SwinBlock, all placeholders for a saved state to be loaded into.
    """
    for pair in reparam_pairs(detector):
        pair.linear.input_quantizer.channel_axis = None
        weight = pair.linear.weight
        if pair.linear.bias is None:
            pair.linear.bias = nn.Parameter(weight.new_zeros(weight.shape[0]))
        if exact_padding and pair.block is not None:
            pair.block.pad_value = weight.new_zeros(weight.shape[1])

