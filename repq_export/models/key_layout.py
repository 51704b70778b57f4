"""The two key layouts of Swin detector checkpoints: Swin-Transformer-Object-Detection / mmdet 2.x
(the module names of this package) and mmdet 3.x, converted both ways, including the channel order
of mmdet 3.x's nn.Unfold-based patch merging."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

LAYOUTS = ("swin-det", "mmdet3")

# (Swin-Det name fragment, mmdet 3.x name fragment) for backbone keys; order matters for renaming.
_MMDET3_NAMES = (
    ("backbone.patch_embed.proj.", "backbone.patch_embed.projection."),
    ("backbone.layers.", "backbone.stages."),
    (".attn.", ".attn.w_msa."),
    (".mlp.fc1.", ".ffn.layers.0.0."),
    (".mlp.fc2.", ".ffn.layers.1."),
)


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """'mmdet3' if the backbone uses mmdet 3.x names (stages, projection), else 'swin-det'."""
    mmdet3 = any(k.startswith(("backbone.stages.", "backbone.patch_embed.projection."))
                 for k in state_dict)
    return "mmdet3" if mmdet3 else "swin-det"


def concat_order(channels: int) -> Tensor:
    """Index ``p`` with ``swin[..., s] = mmdet3[..., p[s]]`` for patch-merging inputs of 4C channels.

    Swin concatenates the 2x2 neighbours as x0 (row 0, col 0), x1 (1, 0), x2 (0, 1), x3 (1, 1),
    each C channels: s = k * C + c. mmdet 3.x's nn.Unfold(2, stride 2) yields u = c * 4 + (2 * row
    + col). Neighbour k = (row, col) thus sits at unfold offset q = (0, 2, 1, 3)[k].
    """
    c = channels // 4
    k = torch.arange(4).repeat_interleave(c)
    q = torch.tensor([0, 2, 1, 3])[k]
    return torch.arange(c).repeat(4) * 4 + q


def mmdet3_to_swin_det(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename mmdet 3.x backbone keys to Swin-Det's and reorder the patch-merging channels."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            for ours, theirs in reversed(_MMDET3_NAMES):
                key = key.replace(theirs, ours)
            value = _reorder_downsample(key, value, to_mmdet3=False)
        out[key] = value
    return out


def swin_det_to_mmdet3(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``mmdet3_to_swin_det`` (how mmdet 3.x would name and order the same weights)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            value = _reorder_downsample(key, value, to_mmdet3=True)
            for ours, theirs in _MMDET3_NAMES:
                key = key.replace(ours, theirs)
        out[key] = value
    return out


def _reorder_downsample(key: str, value: Tensor, to_mmdet3: bool) -> Tensor:
    """Permute the 4C input channels of ``downsample.reduction.weight`` / ``downsample.norm.*``."""
    if ".downsample.reduction." in key:
        dim = 1
    elif ".downsample.norm." in key:
        dim = 0
    else:
        return value
    order = concat_order(value.shape[dim])
    if to_mmdet3:
        order = torch.argsort(order)
    return value.index_select(dim, order).contiguous()
