"""FCN mask head of mmdet 2.11: 3x3 convs + ReLU, 2x deconv + ReLU, 1x1 per-class logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repq_export.models.layers import ConvModule


class FCNMaskHead(nn.Module):
    """``forward(roi_feats (n, C, 14, 14)) -> logits (n, num_classes or 1, 28, 28)``.

    ``upsample`` is an ``nn.ConvTranspose2d`` (the quantization room leaves it in float).
    """

    def __init__(
        self,
        in_channels: int = 256,
        conv_out_channels: int = 256,
        num_convs: int = 4,
        num_classes: int = 80,
        class_agnostic: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        self.convs = nn.ModuleList(
            ConvModule(
                in_channels if i == 0 else conv_out_channels, conv_out_channels, 3, padding=1, act=True
            )
            for i in range(num_convs)
        )
        up_in = conv_out_channels if num_convs else in_channels
        self.upsample = nn.ConvTranspose2d(up_in, conv_out_channels, 2, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.conv_logits = nn.Conv2d(conv_out_channels, 1 if class_agnostic else num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)
        x = self.relu(self.upsample(x))
        return self.conv_logits(x)

    def class_probs(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Sigmoid mask (n, 28, 28) of each RoI's label (channel 0 when class-agnostic)."""
        if self.class_agnostic:
            return logits[:, 0].sigmoid()
        idx = labels.view(-1, 1, 1, 1).expand(-1, 1, logits.shape[2], logits.shape[3])
        return torch.gather(logits, 1, idx).squeeze(1).sigmoid()
