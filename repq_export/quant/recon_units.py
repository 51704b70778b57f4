"""The blocks that block reconstruction (``--recon``) learns one at a time, in forward order.

The backbone's Swin blocks and patch mergings, the FPN neck as one block, and (``heads``) the RPN head
and the RoI heads' box and mask heads. Each unit says how its differentiable outputs follow from the
arguments it was called with, and where its float target comes from: the float model's own output of
that block (``float_chain``: the quantized block learns to undo the error of the blocks before it), or,
for the RoI heads, the float block run on the quantized model's input (their RoIs are the quantized
model's, which the float model never sees).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


def _call(module: nn.Module, *args: Any) -> Any:
    return module(*args)


def _mask_probs(mask_head: nn.Module, x: Tensor) -> Tensor:
    """The mask head's per-class mask probabilities: what the 0.5 threshold reads (saturated logits weigh little)."""
    return mask_head(x).sigmoid()


def _rpn_maps(rpn_head: nn.Module, feats: tuple[Tensor, ...], img_hw: Tensor) -> list[Tensor]:
    """The RPN head's raw per-level logits and deltas (before decoding and NMS, which learn nothing)."""
    return [t for x in feats for t in rpn_head.forward_single(x)]


@dataclass(frozen=True)
class ReconUnit:
    """One reconstructed block: its dotted name, the module, how it runs, where its target comes from."""

    name: str
    module: nn.Module
    run: Callable[..., Any] = _call  # (module, *captured args) -> output tensor(s)
    float_chain: bool = True  # target: the float model's output (True) or the float block on the same input
    out_layers: tuple[str | None, ...] = ()  # per output tensor: the layer whose bias adds to it as is (or None)


def _head_unit(name: str, head: nn.Module, kind: str, mask_probs: bool) -> ReconUnit:
    """A RoI box or mask head as a unit: target the float head on the same RoI features."""
    if kind == "bbox_head":
        return ReconUnit(name, head, float_chain=False, out_layers=("fc_cls", "fc_reg"))
    if mask_probs:
        return ReconUnit(name, head, _mask_probs, float_chain=False)
    return ReconUnit(name, head, float_chain=False, out_layers=("conv_logits",))


def recon_units(detector: nn.Module, heads: bool = True, mask_probs: bool = False) -> list[ReconUnit]:
    """The units of ``detector`` in forward order: backbone blocks and mergings, neck, then (``heads``) the
    RPN head, every box head (cascade stages in order) and every mask head (``mask_probs``: on probabilities)."""
    units = []
    for i, layer in enumerate(detector.backbone.layers):
        for j, block in enumerate(layer.blocks):
            units.append(ReconUnit(f"backbone.layers.{i}.blocks.{j}", block, out_layers=("mlp.fc2",)))
        if layer.downsample is not None:
            units.append(ReconUnit(f"backbone.layers.{i}.downsample", layer.downsample))
    neck = detector.neck
    levels = tuple(f"fpn_convs.{k}" for k in range(len(neck.fpn_convs)))
    units.append(ReconUnit("neck", neck, out_layers=levels + (None,) * (neck.num_outs - len(levels))))
    if not heads:
        return units
    maps = ("rpn_cls", "rpn_reg") * detector.rpn_head.anchor_generator.num_levels
    units.append(ReconUnit("rpn_head", detector.rpn_head, _rpn_maps, out_layers=maps))
    roi = detector.roi_head
    for kind in ("bbox_head", "mask_head"):
        head = getattr(roi, kind, None)
        if head is None:
            continue
        if isinstance(head, nn.ModuleList):
            units += [_head_unit(f"roi_head.{kind}.{k}", h, kind, mask_probs) for k, h in enumerate(head)]
        else:
            units.append(_head_unit(f"roi_head.{kind}", head, kind, mask_probs))
    return units
