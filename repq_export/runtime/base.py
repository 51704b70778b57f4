"""The one interface every stage runs through: a padded image in, network outputs out."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..boundary import NetOutput


class Runner(Protocol):
    """Maps one preprocessed image to network outputs; torch, onnxruntime and TensorRT alike."""

    name: str

    def __call__(self, img: torch.Tensor, img_hw: torch.Tensor) -> NetOutput:
        """img: (1, 3, Hp, Wp) float32 normalized and padded; img_hw: (2,) float32 (h, w)."""
        ...


class GraphRunner(Runner, Protocol):
    """A runner of an ONNX graph that can run another graph with its own settings (tier 1 probes the
    backend's graph with every quantizer's codes as extra outputs, in the session the backend runs)."""

    codes_exact: bool  # False: the backend may flip a code next to a rounding tie (reported, not judged)

    def run_all(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every named output of the graph for `feeds` (input name -> array)."""
        ...

    def with_graph(self, graph: bytes) -> GraphRunner:
        """A runner of the same backend and settings over the ONNX model `graph` (serialized bytes)."""
        ...

