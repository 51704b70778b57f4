"""Quantized layers, the reference's module assignment over a tiny detector, and the calibration flow."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repq_export.config_source import load_config
from repq_export.errors import UserError
from repq_export.models.build import build_detector
from repq_export.quant.assign import quant_counts, quant_table, quantize_modules
from repq_export.quant.calibrate import quantize
from repq_export.quant.layers import QuantConv2d, QuantLinear, QuantMatMul, named_quantizers, quant_disabled
from repq_export.quant.log_sqrt2 import LogSqrt2Quantizer
from repq_export.quant.uniform import UniformQuantizer, fake_quant

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
IMG = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(0))
IMG_HW = torch.tensor([90.0, 150.0])


def tiny_detector(name: str = "mask_rcnn_tiny.py") -> nn.Module:
    torch.manual_seed(0)
    return build_detector(load_config(CONFIGS / name)).eval()


@pytest.fixture(scope="module")
def float_detector() -> nn.Module:
    return tiny_detector()


@pytest.fixture(scope="module")
def quant_detector(float_detector) -> nn.Module:
    return quantize(copy.deepcopy(float_detector), [(IMG, IMG_HW)], 4, 4, progress=False)


def test_quant_linear_and_conv_equal_manual_fake_quant():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(8, 5)
    ql = QuantLinear(linear, UniformQuantizer(4, channel_axis=-1), UniformQuantizer(3, channel_axis=0))
    x = torch.randn(2, 7, 8, generator=g)
    ql.input_quantizer.calibrating = ql.weight_quantizer.calibrating = True
    y = ql(x)
    iq, wq = ql.input_quantizer, ql.weight_quantizer
    want = F.linear(fake_quant(x, iq.scale, iq.zero_point, 4),
                    fake_quant(linear.weight, wq.scale[:, None], wq.zero_point[:, None], 3), linear.bias)
    assert torch.equal(y, want) and ql.weight is linear.weight

    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    qc = QuantConv2d(conv, UniformQuantizer(8), UniformQuantizer(4, channel_axis=0))
    qc.input_quantizer.calibrating = qc.weight_quantizer.calibrating = True
    x = torch.randn(1, 3, 9, 11, generator=g)
    y = qc(x)
    iq, wq = qc.input_quantizer, qc.weight_quantizer
    want = F.conv2d(fake_quant(x, iq.scale, iq.zero_point, 8),
                    fake_quant(conv.weight, wq.scale.view(-1, 1, 1, 1), wq.zero_point.view(-1, 1, 1, 1), 4),
                    conv.bias, stride=2, padding=1)
    assert torch.equal(y, want) and y.shape == (1, 4, 5, 6)

    mm = QuantMatMul(LogSqrt2Quantizer(4), UniformQuantizer(4))
    mm.quantizer_a.calibrating = mm.quantizer_b.calibrating = True
    a, b = torch.randn(2, 6, 6, generator=g).softmax(-1), torch.randn(2, 6, 3, generator=g)
    assert torch.equal(mm(a, b), mm.quantizer_a(a) @ mm.quantizer_b(b))


def test_assignment_on_tiny_mask_rcnn(float_detector):
    det = copy.deepcopy(float_detector)
    quantize_modules(det, w_bits=4, a_bits=6)
    # tiny Mask R-CNN: 8 Swin blocks (qkv, proj, fc1, fc2 + 2 matmuls each), 3 patch mergings,
    # patch embed; FPN 4 lateral + 4 output convs; RPN 3 convs; box head 4 linears;
    # mask head 4 convs + conv_logits (the deconv stays float).
    linears, convs = 8 * 4 + 3 + 4, 1 + 8 + 3 + 5
    counts = quant_counts(quant_table(det))
    assert counts == {
        "softmax log_sqrt2 6-bit per_tensor": 8,
        "activation uniform 6-bit per_channel(axis=-1)": 8 + 8 + 3,
        "activation uniform 6-bit per_tensor": linears + convs - 19 - 1 + 8 * 2 + 8,
        "activation uniform 8-bit per_tensor": 1,
        "weight uniform 4-bit per_channel(axis=0)": linears + convs,
    }
    modules = dict(det.named_modules())
    assert isinstance(modules["roi_head.mask_head.upsample"], nn.ConvTranspose2d)
    assert isinstance(modules["backbone.patch_embed.proj"], QuantConv2d)
    assert modules["backbone.patch_embed.proj.input_quantizer"].bits == 8
    assert modules["backbone.layers.1.downsample.reduction.input_quantizer"].channel_axis == -1
    assert modules["backbone.layers.0.blocks.1.attn.proj.input_quantizer"].channel_axis is None
    assert isinstance(modules["backbone.layers.0.blocks.0.attn.matmul2.quantizer_a"], LogSqrt2Quantizer)
    assert type(modules["backbone.layers.0.blocks.0.attn.matmul1.quantizer_a"]) is UniformQuantizer
    assert isinstance(modules["roi_head.bbox_head.shared_fcs.0"], QuantLinear)
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in det.modules())
    # state-dict keys of the float model survive: only quantizer buffers are added
    float_keys = set(float_detector.state_dict())
    quant_keys = set(det.state_dict())
    assert float_keys <= quant_keys
    assert all(".input_quantizer." in k or ".weight_quantizer." in k or ".quantizer_" in k for k in quant_keys - float_keys)


def test_assignment_on_tiny_cascade_counts():
    det = tiny_detector("cascade_mask_rcnn_tiny.py")
    quantize_modules(det, 4, 4)
    # 3 stages x (4 shared convs + 1 shared fc + fc_cls + fc_reg) and 3 mask heads x 5 convs
    weights = (8 * 4 + 3) + (1 + 8 + 3) + 3 * 7 + 3 * 5
    counts = quant_counts(quant_table(det))
    assert counts["weight uniform 4-bit per_channel(axis=0)"] == weights
    assert counts["activation uniform 4-bit per_tensor"] == weights - 19 - 1 + 8 * 3


def test_quantize_flow_reparameterizes_and_all_quantizers_are_initialized(quant_detector):
    counts = quant_counts(quant_table(quant_detector))
    assert "activation uniform 4-bit per_channel(axis=-1)" not in counts  # all made per_tensor
    assert counts["activation uniform 4-bit per_tensor"] == 88 - 8 - 1
    assert all(bool(q.initialized) for _, q in named_quantizers(quant_detector))
    for name, q in named_quantizers(quant_detector):
        assert (q.scale > 0).all(), name
        if isinstance(q, UniformQuantizer):
            assert torch.equal(q.zero_point, q.zero_point.round()), name  # integer zero points
    settings = quant_detector.quant_settings
    assert (settings.w_bits, settings.a_bits, settings.reparam, settings.exact_padding) == (4, 4, True, True)
    with torch.no_grad():
        boxes, scores, labels, masks = quant_detector(IMG, IMG_HW)
    assert boxes.shape[1] == 4 and masks.shape[1:] == (28, 28) and torch.isfinite(boxes).all()


def test_quantize_is_deterministic(float_detector, quant_detector):
    again = quantize(copy.deepcopy(float_detector), [(IMG, IMG_HW)], 4, 4, progress=False)
    a, b = quant_detector.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disabled_quantizers_give_the_float_model(float_detector):
    det = quantize(copy.deepcopy(float_detector), [(IMG, IMG_HW)], 4, 4, reparam=False, integer_bias=False,
                   progress=False)
    with torch.no_grad(), quant_disabled(det):
        got = det(IMG, IMG_HW)
    with torch.no_grad():
        want = float_detector(IMG, IMG_HW)
        quantized = det(IMG, IMG_HW)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert not torch.equal(quantized[0], want[0])  # and enabled, quantization changes the result
    assert all(q.enabled for _, q in named_quantizers(det))  # the switch was restored


@pytest.mark.parametrize("w_bits, a_bits", [(1, 4), (4, 9), (4.0, 4), (True, 4), ("4", 4)])
def test_bad_bits_are_user_errors(float_detector, w_bits, a_bits):
    with pytest.raises(UserError, match="_bits: must be an integer in 2..8"):
        quantize(copy.deepcopy(float_detector), [(IMG, IMG_HW)], w_bits, a_bits, progress=False)


IMG2 = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(1))
IMG2_HW = torch.tensor([128.0, 90.0])


def first_inputs(model, inputs) -> dict[str, list[torch.Tensor]]:
    """Each quantizer's input at its first call, per image, from plain forwards of ``model``."""
    seen: dict[str, list[torch.Tensor]] = {}
    for img, img_hw in inputs:
        this: dict[str, torch.Tensor] = {}
        def record(module, args, name):
            this.setdefault(name, args[0].clone())  # returns None: the input is left as it is

        hooks = [q.register_forward_pre_hook(lambda m, a, n=n: record(m, a, n)) for n, q in named_quantizers(model)]
        with torch.no_grad():
            model(img, img_hw)
        for h in hooks:
            h.remove()
        for n, x in this.items():
            seen.setdefault(n, []).append(x)
    return seen


def test_two_image_calibration_initialises_every_quantizer_from_both_images(float_detector):
    from repq_export.quant.lockstep import initialize_from_many

    inputs = [(IMG, IMG_HW), (IMG2, IMG2_HW)]
    det = quantize(copy.deepcopy(float_detector), inputs, 4, 4, reparam=False, integer_bias=False, fold_bn=False,
                   progress=False)
    assert len(det.quant_settings.calibration_tensor_sha256) == 2
    # Oracle: with every quantizer calibrated, a plain forward gives each quantizer the input it had
    # during calibration (upstream was calibrated by then); re-initialising from both must agree.
    seen = first_inputs(det, inputs)
    one = quantize(copy.deepcopy(float_detector), inputs[:1], 4, 4, reparam=False, integer_bias=False,
                   fold_bn=False, progress=False)
    differs_from_one_image = 0
    for (name, q), (_, q1) in zip(named_quantizers(det), named_quantizers(one)):
        fresh = copy.deepcopy(q)
        fresh.initialized.fill_(False)
        initialize_from_many(fresh, seen[name])
        assert torch.equal(fresh.scale, q.scale), name
        if isinstance(q, UniformQuantizer):
            assert torch.equal(fresh.zero_point, q.zero_point), name
        differs_from_one_image += not torch.equal(q.scale, q1.scale)
    assert differs_from_one_image > 20  # the second image changed most activation ranges


def test_two_image_calibration_is_deterministic(float_detector):
    inputs = [(IMG, IMG_HW), (IMG2, IMG2_HW)]
    a = quantize(copy.deepcopy(float_detector), inputs, 4, 4, progress=False).state_dict()
    b = quantize(copy.deepcopy(float_detector), inputs, 4, 4, progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_calibration_image_is_a_user_error(float_detector):
    with pytest.raises(UserError, match="none given"):
        quantize(copy.deepcopy(float_detector), [], 4, 4, progress=False)


def test_calibration_without_detections_is_a_user_error(float_detector):
    det = copy.deepcopy(float_detector)
    with torch.no_grad():
        det.roi_head.bbox_head.fc_cls.bias[-1] = 100.0  # background wins everywhere: no detection
    # refused by the float model's own (CPU-independent) verdict, before any quantized forward: the
    # calibrating forward itself may give a few uniform-score boxes on one CPU and none on another
    with pytest.raises(UserError, match="float model detects nothing.*quantizers saw no data"):
        quantize(det, [(IMG, IMG_HW)], 4, 4, progress=False)


def test_a_quantizer_that_saw_one_constant_is_flagged():
    """What happened on another CPU: a mask-head input quantizer calibrated on zeros (scale at the floor)."""
    from repq_export.quant.calibrate import constant_inputs
    from repq_export.quant.uniform import UniformQuantizer

    zeros, real, weight = UniformQuantizer(4), UniformQuantizer(4), UniformQuantizer(4, channel_axis=0)
    zeros.initialize(torch.zeros(8, 256))
    real.initialize(torch.randn(8, 256))
    weight.initialize(torch.zeros(8, 16))  # a weight channel of zeros is legitimate (pruned)
    named = [("roi_head.mask_head.convs.0.conv.input_quantizer", zeros), ("neck.input_quantizer", real),
             ("neck.weight_quantizer", weight)]
    assert float(zeros.scale) == pytest.approx(1e-8) and float(real.scale) > 1e-3
    assert constant_inputs(named) == ["roi_head.mask_head.convs.0.conv.input_quantizer"]


@pytest.mark.parametrize("sample, ulps", [(0, 1), (1, 1), (2, 1), (2, 5), (0, 1.5)])
def test_nudged_activations_move_every_activation_input_by_k_ulps(quant_detector, sample, ulps):
    from repq_export.evaluation.noise_floor import nudged_activations

    activations = [(n, q) for n, q in named_quantizers(quant_detector) if not n.endswith("weight_quantizer")]
    before, after = {}, {}

    def record(store, name):
        return lambda module, args: store.setdefault(name, []).append(args[0].detach().clone())

    with torch.no_grad():
        plain = quant_detector(IMG, IMG_HW)
        hooks = [q.register_forward_pre_hook(record(before, n)) for n, q in activations]
        with nudged_activations(quant_detector, sample, ulps) as steps:  # pre-hooks run in registration order
            hooks += [q.register_forward_pre_hook(record(after, n)) for n, q in activations]
            quant_detector(IMG, IMG_HW)
        for hook in hooks:
            hook.remove()
        again = quant_detector(IMG, IMG_HW)
    assert len(steps) == len(activations) > 20 and before.keys() == after.keys() == {n for n, _ in activations}
    assert steps == [ulps] * len(activations)
    inf = torch.tensor(float("inf"))
    moved = {}  # signed ulps -> values moved so
    for name in before:
        for x, y in zip(before[name], after[name]):
            up, down, seen = x, x, torch.zeros_like(x, dtype=torch.bool)
            for k in range(1, math.floor(ulps) + 2):
                up, down = torch.nextafter(up, inf.expand_as(x)), torch.nextafter(down, -inf.expand_as(x))
                for signed, target in ((k, up), (-k, down)):
                    hit = (y == target) & ~seen
                    moved[signed] = moved.get(signed, 0) + int(hit.sum())
                    seen |= hit
            assert bool(seen.all()), name  # every value moved a whole number of ulps near `ulps`
    total = sum(moved.values())
    ups = sum(n for k, n in moved.items() if k > 0)
    sizes = {abs(k) for k, n in moved.items() if n}
    if ulps == int(ulps):
        assert sizes == {ulps}  # exactly `ulps` ulps each
    else:  # 1.5: one or two ulps, half each
        assert sizes == {1, 2} and 0.45 < sum(n for k, n in moved.items() if abs(k) == 2) / total < 0.55
    if sample == 0:
        assert ups == total  # sample 0: all up
    elif sample == 1:
        assert ups == 0  # sample 1: all down
    else:
        assert 0.45 < ups / total < 0.55  # later samples: each value up or down at random
    assert all(torch.equal(a, b) for a, b in zip(plain, again))  # the nudge is gone after the block
