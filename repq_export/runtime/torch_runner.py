"""Runs a PyTorch detector (float or fake-quant) behind the Runner interface."""

from __future__ import annotations

import torch
from torch import nn

from ..boundary import NetOutput, as_net_output


class TorchRunner:
    """Float or fake-quant PyTorch detector on `device` (cpu or cuda)."""

    def __init__(self, model: nn.Module, device: str = "cpu", name: str = "torch") -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.name = name

    @torch.no_grad()
    def __call__(self, img: torch.Tensor, img_hw: torch.Tensor) -> NetOutput:
        out = self.model(img.to(self.device), img_hw.to(self.device))
        return as_net_output(out)
