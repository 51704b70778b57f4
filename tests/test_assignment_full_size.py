"""The reference's quantizer assignment over full-size Mask R-CNN Swin-T and Cascade Swin-S.

Counts derived by hand: Swin-T has 12 blocks (4 linears, 2 matmuls each) and 3 patch mergings;
the detector adds the patch embedding, 8 FPN convs, 3 RPN convs, and either a 2-fc box head with a
5-conv mask head, or three 4conv1fc box heads with three mask heads.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from repq_export.models.arch import ARCHS
from repq_export.models.build import build_detector
from repq_export.models.mmdet_config import config_from_arch
from repq_export.quant.assign import quant_table, quantize_modules
from repq_export.quant.layers import QuantConv2d, QuantLinear, QuantMatMul


def quantized_skeleton(arch: str, w_bits: int, a_bits: int):
    with torch.device("meta"):  # structure only: no memory for 100M parameters
        model = build_detector(config_from_arch(ARCHS[arch]))
    quantize_modules(model, w_bits, a_bits)
    return model


@pytest.mark.parametrize(
    "arch, convs, linears, matmuls, per_channel",
    [
        ("mask_rcnn_swin_t", 1 + 8 + 3 + 5, 12 * 4 + 3 + 4, 12 * 2, 12 + 12 + 3),
        ("cascade_swin_s", 1 + 8 + 3 + 3 * 4 + 3 * 5, 24 * 4 + 3 + 3 * 3, 24 * 2, 24 + 24 + 3),
    ],
)
def test_layer_and_quantizer_counts(arch, convs, linears, matmuls, per_channel):
    model = quantized_skeleton(arch, 6, 4)
    kinds = Counter(type(m) for m in model.modules())
    assert (kinds[QuantConv2d], kinds[QuantLinear], kinds[QuantMatMul]) == (convs, linears, matmuls)
    assert kinds[torch.nn.Conv2d] == 0 and kinds[torch.nn.Linear] == 0  # nothing left in float
    assert kinds[torch.nn.ConvTranspose2d] == (1 if arch.startswith("mask") else 3)  # mask upsample stays float
    rows = Counter((e.kind, e.bits, e.granularity.split("(")[0]) for e in quant_table(model))
    weights = convs + linears
    assert sum(n for (kind, bits, g), n in rows.items() if bits == 6) == weights  # every weight at w_bits
    assert rows[("uniform", 8, "per_tensor")] == 1  # the patch-embed input
    assert rows[("log_sqrt2", 4, "per_tensor")] == matmuls // 2  # the softmax outputs
    assert rows[("uniform", 4, "per_channel")] == per_channel  # inputs of qkv, fc1, reduction
    assert sum(rows.values()) == weights + weights + 2 * matmuls  # an input quantizer per layer, two per matmul
