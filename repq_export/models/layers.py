"""Small building blocks shared by the backbone, the neck and the heads."""

from __future__ import annotations

from torch import Tensor, nn


class MatMul(nn.Module):
    """``a @ b`` as a module, so that the quantization room can swap it for a quantized matmul."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b


class ConvModule(nn.Module):
    """Conv2d, then optionally BatchNorm2d, then optionally ReLU (mmcv ``ConvModule`` layout).

    Children are named ``conv``, ``bn`` and ``activate`` so that state-dict keys match
    mmdet checkpoints (``...convs.0.conv.weight``, ``...convs.0.bn.running_mean``).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        padding: int = 0,
        stride: int = 1,
        bias: bool = True,
        norm: bool = False,
        act: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=bias)
        self.bn = nn.BatchNorm2d(out_ch) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x
