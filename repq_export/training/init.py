"""Initialisation of the neck and heads as mmdet 2.11 does it before training (the Swin backbone
initialises itself): small normal weights on the RPN and on the box classifier / regressor,
so the first proposals and refinements stay near the anchors and RoIs; Xavier on the FPN and the
shared fcs; Kaiming (fan out, ReLU) on the head convs and the mask deconv / logits. And the
start of a detector from another one's backbone, neck and RPN (a cascade head trained on top).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from repq_export.errors import UserError
from repq_export.files import check_input_file
from repq_export.models.detector import Detector


def _normal(module: nn.Module, std: float) -> None:
    nn.init.normal_(module.weight, 0.0, std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _xavier(module: nn.Module) -> None:
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _kaiming(module: nn.Module) -> None:
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _as_list(module: nn.Module) -> list[nn.Module]:
    return list(module) if isinstance(module, nn.ModuleList) else [module]


def init_like_mmdet(detector: Detector) -> None:
    """Re-initialise ``neck``, ``rpn_head`` and ``roi_head`` of a freshly built detector in place."""
    for m in detector.neck.modules():
        if isinstance(m, nn.Conv2d):
            _xavier(m)
    rpn = detector.rpn_head
    for conv in (rpn.rpn_conv, rpn.rpn_cls, rpn.rpn_reg):
        _normal(conv, 0.01)
    roi = detector.roi_head
    for head in _as_list(roi.bbox_head):
        for m in head.shared_convs.modules():
            if isinstance(m, nn.Conv2d):
                _kaiming(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for fc in head.shared_fcs:
            _xavier(fc)
        _normal(head.fc_cls, 0.01)
        _normal(head.fc_reg, 0.001)
    for head in _as_list(roi.mask_head):
        for m in head.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                _kaiming(m)


SHARED_PARTS = ("backbone.", "neck.", "rpn_head.")


def init_from_checkpoint(detector: Detector, path: str | Path, parts: tuple[str, ...] = SHARED_PARTS) -> int:
    """Copy the tensors under ``parts`` from a checkpoint (``state_dict`` layout of this project's
    detectors) into ``detector``; every such key of the detector must be there with its shape.
    Returns the number of tensors copied."""
    if Path(path).exists():  # a FIFO or a device is refused, not waited on or read without end
        check_input_file(path, "checkpoint")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, truncated, not a checkpoint, or objects weights_only refuses
        raise UserError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err})") from None
    source = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
    target = detector.state_dict()
    wanted = [k for k in target if k.startswith(parts)]
    bad = [k for k in wanted if k not in source or source[k].shape != target[k].shape]
    if bad:
        raise UserError(f"{path}: no tensor of the same shape for {bad[0]} ({len(bad)} of {len(wanted)} differ); "
                        "it must come from a detector with the same backbone, neck and RPN")
    detector.load_state_dict({k: source[k] for k in wanted}, strict=False)
    return len(wanted)
