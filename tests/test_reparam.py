"""Scale reparameterization: float function preserved (exactly only with exact padding), the
per-channel grid mapped onto the per-tensor one, integer vs fractional zero point, bias creation."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from repq_export.config_source import load_config
from repq_export.models.build import build_detector
from repq_export.quant.assign import quantize_modules
from repq_export.quant.calibrate import calibrate
from repq_export.quant.layers import QuantLinear, quant_disabled
from repq_export.quant.reparam import ReparamPair, reparam_pairs, reparameterize, reparameterize_pair
from repq_export.quant.uniform import UniformQuantizer, fake_quant

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
# 96 x 160 -> token maps 24x40, 12x20, 6x10, 3x5: none is a multiple of the 7x7 window
IMG = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(0))
IMG_HW = torch.tensor([90.0, 150.0])


@pytest.fixture(scope="module")
def calibrated() -> nn.Module:
    """Tiny Mask R-CNN with non-trivial LayerNorm affines, quantized and calibrated, not reparameterized."""
    torch.manual_seed(0)
    det = build_detector(load_config(CONFIGS / "mask_rcnn_tiny.py")).eval()
    with torch.no_grad():
        for m in det.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn_like(m.weight))
                m.bias.copy_(0.5 * torch.randn_like(m.bias))
    quantize_modules(det, 4, 4)
    calibrate(det, [(IMG, IMG_HW)], progress=False)
    return det


def float_features(det: nn.Module) -> list[torch.Tensor]:
    """Backbone and FPN outputs with quantizers off (the detector's boxes go through NMS/top-k,
    whose selections flip under any perturbation of a random model, so features are compared)."""
    with torch.no_grad(), quant_disabled(det):
        return list(det.backbone(IMG)) + list(det.extract_feat(IMG))


def max_rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(a, b))


def test_reparam_preserves_the_float_model_only_with_exact_padding(calibrated):
    before = float_features(calibrated)
    errors = {}
    for exact in (True, False):
        det = copy.deepcopy(calibrated)
        reparameterize(det, integer_zero_point=True, exact_padding=exact)
        errors[exact] = max_rel_error(before, float_features(det))
    print(f"max relative change of features: exact padding {errors[True]:.2e}, zero padding {errors[False]:.2e}")
    assert errors[True] <= 1e-5
    assert errors[False] > 1e-3  # the reference's zero padding is not equivalent on these sizes


def test_reparam_with_window_multiple_maps_is_exact_even_with_zero_padding(calibrated):
    img = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))  # maps 28, 14, 7: multiples of 7
    with torch.no_grad(), quant_disabled(calibrated):
        before = list(calibrated.backbone(img))
    det = copy.deepcopy(calibrated)
    reparameterize(det, integer_zero_point=False, exact_padding=False)
    with torch.no_grad(), quant_disabled(det):
        after = list(det.backbone(img))
    assert max_rel_error(before[:3], after[:3]) <= 1e-5


def original_grid(q: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    return q.scale.clone(), q.zero_point.clone()


@pytest.mark.parametrize("integer_zero_point", [True, False])
def test_per_channel_grid_maps_onto_the_per_tensor_grid(calibrated, integer_zero_point):
    """y' = y / r - b. With an integer z~, round(y'/s~) + z~ = round(y/s_c) + z_c: the per-tensor
    codes ARE the per-channel codes and (q(y') + b) * r is the per-channel fake quant of y.
    With the reference's fractional z~ the per-tensor grid {s~ m} maps back to
    s_c (m + z~ - z_c): shifted by frac(z~) of a step, so the quantization changes."""
    det = copy.deepcopy(calibrated)
    block = det.backbone.layers[1].blocks[0]
    s, z = original_grid(block.attn.qkv.input_quantizer)
    x = torch.randn(2, 60, block.dim, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        y = block.norm1(x)
        codes_before = block.attn.qkv.input_quantizer.codes(y)
        dequant_before = fake_quant(y, s, z, 4)
        reparameterize_pair(ReparamPair("n1", block.norm1, block.attn.qkv, block), integer_zero_point, True)
        q = block.attn.qkv.input_quantizer
        y_new = block.norm1(x)
    s_t, z_t = s.mean(), z.mean()
    if integer_zero_point:
        z_t = z_t.round()
    assert q.channel_axis is None and torch.equal(q.scale, s_t) and torch.equal(q.zero_point, z_t)
    r = s / s_t
    b = -z * s / r + z_t * s_t
    assert torch.allclose(y_new, y / r - b, atol=1e-5)
    assert torch.allclose(block.pad_value, -b)
    mapped_back = (q(y_new) + b) * r
    if integer_zero_point:
        mismatches = int((q.codes(y_new) != codes_before).sum())
        print(f"integer z~: {mismatches} of {codes_before.numel()} codes differ from the per-channel ones")
        assert mismatches <= codes_before.numel() * 1e-3  # only float ties at rounding boundaries
        assert torch.allclose(mapped_back, dequant_before, atol=1e-5)
    else:
        frac = (z_t - z_t.round()).abs().item()
        assert frac > 0.05
        shift = ((mapped_back - dequant_before).abs() / s).amax().item()
        print(f"fractional z~ (frac {frac:.3f}): mapped-back grid off the per-channel one by {shift:.3f} steps")
        assert shift > 0.5 * frac


def test_integer_and_fractional_zero_points(calibrated):
    grids = {p.name: original_grid(p.linear.input_quantizer) for p in reparam_pairs(calibrated)}
    integer, fractional = copy.deepcopy(calibrated), copy.deepcopy(calibrated)
    reparameterize(integer, integer_zero_point=True, exact_padding=True)
    reparameterize(fractional, integer_zero_point=False, exact_padding=False)
    fractions = []
    for p_int, p_frac in zip(reparam_pairs(integer), reparam_pairs(fractional)):
        s, z = grids[p_int.name]
        assert p_int.linear.input_quantizer.zero_point.item() == torch.round(z.mean()).item()
        assert torch.equal(p_frac.linear.input_quantizer.zero_point, z.mean())
        fractions.append(abs(z.mean().item() - round(z.mean().item())))
        if p_int.block is not None:
            assert p_int.block.pad_value is not None and p_int.block.pad_value.shape == (p_int.block.dim,)
            assert p_frac.block.pad_value is None
    assert max(fractions) > 0.05  # the reference's z~ really is fractional here


def test_reduction_gets_a_bias_and_weight_quantizers_are_reinitialized(calibrated):
    det = copy.deepcopy(calibrated)
    down = det.backbone.layers[0].downsample
    assert down.reduction.bias is None
    old_weight = down.reduction.weight.detach().clone()
    s, z = original_grid(down.reduction.input_quantizer)
    x = torch.randn(1, 30, 4 * down.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), quant_disabled(det):
        before = down.reduction(down.norm(x))
    reparameterize(det)
    assert isinstance(down.reduction, QuantLinear) and isinstance(down.reduction.bias, nn.Parameter)
    assert torch.allclose(down.reduction.weight, old_weight * (s / s.mean()))
    with torch.no_grad(), quant_disabled(det):
        after = down.reduction(down.norm(x))
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)
    fresh = UniformQuantizer(4, channel_axis=0)
    fresh.initialize(down.reduction.weight)
    assert torch.equal(down.reduction.weight_quantizer.scale, fresh.scale)
    assert torch.equal(down.reduction.weight_quantizer.zero_point, fresh.zero_point)


def test_reparam_needs_calibrated_per_channel_quantizers():
    torch.manual_seed(0)
    det = build_detector(load_config(CONFIGS / "mask_rcnn_tiny.py")).eval()
    with pytest.raises(ValueError, match="quantized linear"):
        reparam_pairs(det)
    quantize_modules(det, 4, 4)
    with pytest.raises(ValueError, match="not calibrated per-channel"):
        reparameterize(det)
