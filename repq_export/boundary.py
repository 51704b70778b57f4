"""The network boundary: what the detector takes and returns, in the exported graph and every runner.

In: ``img`` (1, 3, Hp, Wp) float32, normalized and padded; ``img_hw`` (2,) float32, the resized
image's (h, w) before padding. Out, in resized-image pixels: ``boxes`` (N, 4) float32 x1y1x2y2
clipped to img_hw, ``scores`` (N,) float32, ``labels`` (N,) int64 0-based, ``masks``
(N, MASK_SIZE, MASK_SIZE) float32 sigmoid RoI-mask probabilities of each box's label. Everything
before (decoding, resizing) and after (rescaling, mask pasting) is host code (``data/``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

INPUT_NAMES = ("img", "img_hw")
OUTPUT_NAMES = ("boxes", "scores", "labels", "masks")
#: side of the RoI masks: the mask head's 14x14 RoI features, upsampled 2x by its deconv
MASK_SIZE = 28

#: the four outputs as the torch detector returns them (boxes, scores, labels, masks)
NetTensors = tuple[Tensor, Tensor, Tensor, Tensor]


class NetOutput(NamedTuple):
    """Network outputs for one image, as CPU tensors of the boundary's dtypes (``as_net_output``)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


def as_net_output(outputs) -> NetOutput:
    """Bring four backend outputs (tensors or arrays, any device) to CPU tensors of fixed dtypes."""
    boxes, scores, labels, masks = (torch.as_tensor(o).cpu() for o in outputs)
    return NetOutput(
        boxes.float().reshape(-1, 4),
        scores.float().reshape(-1),
        labels.long().reshape(-1),
        masks.float().reshape(-1, *masks.shape[-2:]),
    )
