"""The one interface every stage runs through: a padded image in, network outputs out."""

from __future__ import annotations

from typing import Protocol

import torch

from ..boundary import NetOutput


class Runner(Protocol):
    """Maps one preprocessed image to network outputs; torch, onnxruntime and TensorRT alike."""

    name: str

    def __call__(self, img: torch.Tensor, img_hw: torch.Tensor) -> NetOutput:
        """img: (1, 3, Hp, Wp) float32 normalized and padded; img_hw: (2,) float32 (h, w)."""
        ...
