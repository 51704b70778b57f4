"""Checks on a checkpoint file before it becomes a model: what the file is, finite weights, the keys
the architecture is read from. Each failure is a one-line UserError naming the file and what is wrong."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from repq_export.errors import UserError
from repq_export.resources import MAX_TENSOR_ELEMENTS

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


# Integer buffers the detectors really have (Swin's window index table, BatchNorm's step counter);
# every other entry is a float weight. Only num_batches_tracked is a 0-dim scalar.
INTEGER_BUFFERS = ("relative_position_index", "num_batches_tracked")
SCALAR_BUFFERS = ("num_batches_tracked",)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def tensor_problem(key: str, value: Tensor) -> str | None:
    """Why a state-dict tensor cannot become a detector weight (None if it can), read off its metadata
    only: nothing here touches its elements."""
    name = key.rsplit(".", 1)[-1]
    if value.is_quantized:
        return f"is a quantized tensor ({value.dtype}); save the float model's state dict instead"
    if value.layout != torch.strided or value.is_nested:
        layout = str(value.layout).replace("torch.", "")
        return f"is a {layout} tensor; weights must be dense (call .to_dense() before saving)"
    if value.is_meta or value.device.type == "meta":
        return "is a meta-device tensor (a shape without data); save the weights themselves"
    if value.numel() > MAX_TENSOR_ELEMENTS:
        return (f"claims {value.numel():,} elements (shape {tuple(value.shape)}), over the limit of "
                f"{MAX_TENSOR_ELEMENTS:,}: no detector weight is that large")
    if name in INTEGER_BUFFERS:
        if value.dtype not in INTEGER_DTYPES:
            return f"is {value.dtype}; this buffer holds integers"
    elif value.dtype not in FLOAT_DTYPES:
        return (f"is a {value.dtype} tensor; weights must be floating point (casting would "
                f"{'drop the imaginary part' if value.is_complex() else 'change what it means'})")
    if value.dim() == 0 and name not in SCALAR_BUFFERS:
        return "is a 0-dim scalar where a weight tensor is expected"
    return None


def check_tensors(state_dict: Mapping[str, Tensor], path: Path) -> None:
    """Refuse, naming the first, a tensor that cannot be a detector weight (see tensor_problem)."""
    for key, value in state_dict.items():
        problem = tensor_problem(str(key), value)
        if problem is not None:
            raise UserError(f"{path}: state_dict entry {str(key)[:200]} {problem}")


def check_finite(state_dict: Mapping[str, Tensor], path: Path) -> None:
    """Refuse NaN or Inf in any floating-point tensor, naming the first: nothing sensible comes of them."""
    for key, value in state_dict.items():
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(f"{path}: {key} holds {bad} NaN/Inf value(s) of {value.numel()}; the checkpoint "
                            "is damaged (or diverged in training)")
