"""Checks on a checkpoint file before it becomes a model: what the file is, finite weights, the keys
the architecture is read from. Each failure is a one-line UserError naming the file and what is wrong."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from repq_export.errors import UserError

# the keys whose shapes give the architecture (models/arch.py arch_from_state_dict reads them)
ARCH_KEYS = (
    "backbone.patch_embed.proj.weight",
    *(f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table" for i in range(4)),
    "backbone.layers.0.blocks.0.mlp.fc1.weight",
    "neck.lateral_convs.0.conv.weight",
    "rpn_head.rpn_conv.weight",
    "rpn_head.rpn_cls.weight",
)


_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # torch.serialization.MAGIC_NUMBER, pickled


def sniff_file(path: Path) -> str:
    """'torch' for what may be a torch.save file (a zip archive or a legacy pickle stream), else what it is."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty file, 0 bytes"
    if head.startswith(b"PK"):
        return "torch"
    if head.startswith(b"\x80"):  # a pickle; torch's legacy format opens with its pickled magic number
        return "torch" if _LEGACY_MAGIC in head else "a plain Python pickle, not written by torch.save"
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "a JSON or text file"
    if text.startswith((b"#", b"import", b"model", b"_base_")):
        return "a text file (a config? pass it with --config)"
    return "unknown content, not a zip archive or a pickle"


def check_finite(state_dict: Mapping[str, Tensor], path: Path) -> None:
    """Refuse NaN or Inf in any floating-point tensor, naming the first: nothing sensible comes of them."""
    for key, value in state_dict.items():
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(f"{path}: {key} holds {bad} NaN/Inf value(s) of {value.numel()}; the checkpoint "
                            "is damaged (or diverged in training)")
