"""The checkpoint of a trained detector in the Swin-Transformer-Object-Detection (mmdet 2.11)
layout: ``{'meta': {...}, 'state_dict': {...}}`` with exactly the Detector's keys in fp32, so the
bundled checkpoints load through the same path (``models.checkpoint``) as released ones.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from repq_export.models.random_checkpoint import config_text

MMDET_VERSION = "2.11.0"


def fp32_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The model's state dict, detached and cloned, floating tensors as float32."""
    return OrderedDict(
        (k, v.detach().clone().float() if v.is_floating_point() else v.detach().clone())
        for k, v in model.state_dict().items()
    )


def trained_checkpoint(model: nn.Module, cfg: Mapping[str, Any], classes: tuple[str, ...], **meta: Any) -> dict:
    """``{'meta': {mmdet_version, CLASSES, config (flat text of cfg), **meta}, 'state_dict'}``."""
    head = dict(mmdet_version=MMDET_VERSION, CLASSES=tuple(classes), config=config_text(cfg))
    return dict(meta={**head, **meta}, state_dict=fp32_state_dict(model))
