"""Turn a calibrated fake-quant detector into a module whose trace is the QDQ ONNX graph.

Each quantized layer is replaced, at the same module path (so ONNX node names carry the
quantizer's name), by an export layer built from the quantization state alone:
weight codes + per-channel scales, and each input quantizer lowered by its kind and by the
form the backend needs (`forms.py`, `qdq.py`). BatchNorm after a quantized conv was folded already by the quant room
(`quant/bn_fold.py`), so the graph computes the fake-quant model itself. Nothing is re-calibrated.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..quant.integer_bias import bias_grid
from ..quant.kinds import LOG_SQRT2, SHIFTED, UNIFORM
from ..quant.layers import QuantConv2d, QuantLinear, QuantMatMul
from ..quant.log_sqrt2 import LogSqrt2Quantizer
from ..quant.uniform import UniformQuantizer
from ..graph_targets import GraphForm, LogSqrt2Lowering
from .forms import ONNXRUNTIME, OPENVINO, TENSORRT
from .qdq import (DQBias, DQWeight, QDQActivation, QDQActivationU8, log_sqrt2_bisected, log_sqrt2_lowered,
                  log_sqrt2_odd_half)

TABLE, BISECT = LogSqrt2Lowering.TABLE, LogSqrt2Lowering.BISECT

INT8_MIN, INT8_MAX = -128, 127
#: |int8 weight code| at most this in the onnxruntime form: u8s8 kernels on AVX2 without VNNI add
#: two u8 x s8 products in int16 (vpmaddubsw), and 2 * 255 * 64 = 32640 <= 32767 cannot saturate.
U8S8_SAFE_WEIGHT = 64
INT16_MAX = 32767


def code_range(q: UniformQuantizer) -> tuple[Tensor, Tensor]:
    """Signed code bounds (lo, hi) = (-zp, 2^n - 1 - zp) of a uniform quantizer, as float tensors."""
    return -q.zero_point, (2**q.bits - 1) - q.zero_point


def fits_int8(q: UniformQuantizer) -> bool:
    """Whether every signed code q - zp of the quantizer lies in int8."""
    lo, hi = code_range(q)
    return bool((lo >= INT8_MIN).all() and (hi <= INT8_MAX).all())


class ActivationQDQ(nn.Module):
    """A per-tensor uniform activation quantizer as Clip -> QuantizeLinear -> DequantizeLinear."""

    kind, form = UNIFORM, TENSORRT

    def __init__(self, q: UniformQuantizer, name: str) -> None:
        super().__init__()
        if q.per_channel:
            raise UserError(f"{name}: per-channel activation quantizer cannot be exported "
                            "(TensorRT wants per-tensor; keep the scale reparameterization on)")
        lo, hi = code_range(q)
        self.register_buffer("scale", q.scale.detach().clone())
        self.register_buffer("clip_lo", (lo * q.scale).detach().clone())
        self.register_buffer("clip_hi", (hi * q.scale).detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return QDQActivation.apply(x, self.scale, self.clip_lo, self.clip_hi)


class ShiftedActivationQDQ(nn.Module):
    """An activation whose codes do not fit int8 (8-bit asymmetric): shifted into int8.

    Codes q in [0, 255] are carried as q - 128 by quantizing x + (zp - 128) * d; the consumer
    subtracts the shift through its bias (`shift` is read by the export conv). Exact up to float
    ties when the consumer has no padding, as the 4x4/stride-4 patch embedding.
    """

    kind, form = SHIFTED, TENSORRT

    def __init__(self, q: UniformQuantizer, name: str) -> None:
        super().__init__()
        if q.per_channel:
            raise UserError(f"{name}: per-channel activation quantizer cannot be exported")
        offset = q.zero_point - 2 ** (q.bits - 1)
        self.register_buffer("scale", q.scale.detach().clone())
        self.register_buffer("shift", (offset * q.scale).detach().clone())
        half = 2 ** (q.bits - 1)
        self.register_buffer("clip_lo", (-half * q.scale).detach().clone())
        self.register_buffer("clip_hi", ((half - 1) * q.scale).detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return QDQActivation.apply(x + self.shift, self.scale, self.clip_lo, self.clip_hi)


class ActivationU8(nn.Module):
    """A per-tensor uniform activation for onnxruntime: QuantizeLinear(uint8, own zero point) ->
    Clip(uint8, 0, 2^n - 1) -> DequantizeLinear (`qdq.QDQActivationU8`); 8-bit fits as is."""

    kind, form = UNIFORM, ONNXRUNTIME

    def __init__(self, q: UniformQuantizer, name: str) -> None:
        super().__init__()
        if q.per_channel:
            raise UserError(f"{name}: per-channel activation quantizer cannot be exported "
                            "(keep the scale reparameterization on)")
        zp = float(q.zero_point)
        if zp != round(zp) or not 0 <= zp <= 255:
            raise UserError(f"{name}: zero point {zp} is not an integer in 0..255; export needs integer "
                            "zero points")
        self.zero_point, self.n_bits = int(zp), q.bits
        self.register_buffer("scale", q.scale.detach().clone())
        self.register_buffer("zp", torch.tensor(zp))
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(2.0**q.bits - 1))

    def forward(self, x: Tensor) -> Tensor:
        return QDQActivationU8.apply(x, self.scale, self.zp, self.lo, self.hi, self.zero_point, self.n_bits)


class LogSqrt2Lowered(nn.Module):
    """The log-sqrt2 quantizer as float ops with exact codes: Log and table lookups
    (`qdq.log_sqrt2_lowered`) or, for OpenVINO, a binary search by comparisons (`qdq.log_sqrt2_bisected`)."""

    kind = LOG_SQRT2

    def __init__(self, q: LogSqrt2Quantizer, form: GraphForm, lowering: LogSqrt2Lowering = TABLE) -> None:
        super().__init__()
        self.form, self.lowering = form, lowering
        self.n_bits = q.bits
        self.register_buffer("scale", q.scale.detach().clone())
        self.register_buffer("upper", q.thresholds().detach().clone())  # the 2^n boundaries t_0 > t_1 > ...
        self.register_buffer("lut", q.lut().detach().clone())
        self.register_buffer("odd_half", log_sqrt2_odd_half() if lowering == BISECT else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.lowering == BISECT:
            return log_sqrt2_bisected(x, self.scale, self.upper, self.odd_half, self.n_bits)
        return log_sqrt2_lowered(x, self.scale, self.upper, self.lut, self.n_bits, cast_floors=self.form == ONNXRUNTIME)


def lower_activation(q: nn.Module, name: str, allow_shift: bool = False, *, form: GraphForm,
                     log_sqrt2: LogSqrt2Lowering = TABLE) -> nn.Module:
    """The export form of an input quantizer, by kind, backend form and (log-sqrt2) lowering."""
    if isinstance(q, LogSqrt2Quantizer):
        return LogSqrt2Lowered(q, form, log_sqrt2)
    if not isinstance(q, UniformQuantizer):
        raise TypeError(f"{name}: unknown quantizer {type(q).__name__}")
    if form == ONNXRUNTIME:
        return ActivationU8(q, name)
    if fits_int8(q):
        return ActivationQDQ(q, name)
    if allow_shift and q.bits == 8:
        return ShiftedActivationQDQ(q, name)
    if form == OPENVINO and q.bits == 8:  # OpenVINO runs uint8 activations with a zero point on int8 kernels
        return ActivationU8(q, name)
    raise UserError(f"{name}: {q.bits}-bit codes with zero point {int(q.zero_point)} do not fit int8; "
                    "this layer cannot be exported exactly")


def weight_codes(layer: QuantConv2d | QuantLinear, name: str,
                 form: GraphForm) -> tuple[Tensor, Tensor, Tensor | None]:
    """Weight codes, per-output-channel scale and zero point (None: int8 codes q - zp, zero point 0).

    TensorRT form: int8 q - zp, always. onnxruntime form: the same while every code lies in
    +-U8S8_SAFE_WEIGHT (the u8s8 kernels cannot saturate), else uint8 codes q with the
    quantizer's per-channel zero points (8-bit weights, whose q - zp reaches +-255; the rewrites
    multiply them as two narrow int8 halves, `rules/split_uint8_weights.py`). OpenVINO form: int8
    q - zp where that fits, else int8 q - 128 (`offset_weight_codes`).
    """
    q = layer.weight_quantizer
    if not q.per_channel or q.channel_axis != 0:
        raise UserError(f"{name}: weight quantizer must be per output channel")
    zp = q.zero_point.reshape(-1, *([1] * (layer.weight.dim() - 1)))
    codes = q.codes(layer.weight.detach())
    lo, hi = code_range(q)
    if form == ONNXRUNTIME and not bool((lo >= -U8S8_SAFE_WEIGHT).all() and (hi <= U8S8_SAFE_WEIGHT).all()):
        if (q.zero_point != torch.round(q.zero_point)).any():
            raise UserError(f"{name}: weight zero points are not integers; export needs integer zero points")
        return codes.to(torch.uint8), q.scale.detach().clone(), q.zero_point.detach().to(torch.uint8)
    if form == OPENVINO and not fits_int8(q) and q.bits == 8:
        return offset_weight_codes(layer, name)[:2] + (None,)
    if not fits_int8(q):
        raise UserError(f"{name}: {q.bits}-bit asymmetric weight codes do not fit int8 "
                        "(the TensorRT form supports weights of 2..7 bits)")
    return (codes - zp).to(torch.int8), q.scale.detach().clone(), None


def offset_weight_codes(layer: QuantConv2d | QuantLinear, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """8-bit weights for OpenVINO: int8 codes q - 128, their scale, and the per-output-channel
    correction (128 - zp) * s, since s * (q - zp) = s * (q - 128) + (128 - zp) * s.

    OpenVINO's int8 kernels take weights with zero point 0 only (uint8 codes with per-channel zero
    points run as f32); the layer then adds correction * sum(x) over each output's receptive field.
    """
    q = layer.weight_quantizer
    if (q.zero_point != torch.round(q.zero_point)).any():
        raise UserError(f"{name}: weight zero points are not integers; export needs integer zero points")
    half = 2 ** (q.bits - 1)
    codes = q.codes(layer.weight.detach()) - half
    correction = (half - q.zero_point.detach().reshape(-1)) * q.scale.detach().reshape(-1)
    return codes.to(torch.int8), q.scale.detach().clone(), correction.clone()


def sum_weights(shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """int8 codes all 1 at scale 1 in `shape` (one output channel): a conv or linear with them computes sum(x)
    over each output's receptive field, the zero-point correction's sum, on the same int8 kernels as the layer.

    Written so because OpenVINO gets a sum of the dequantized input wrong or slow: `ReduceSum(x)` inside
    the fused graph sums the uint8 codes in 8 bits (the bundled Mask R-CNN at W8A8 matched 6% of its
    detections), `x @ ones` with float ones runs in f32 on the dequantized input, and one more output
    channel on the layer itself costs a reference-kernel split (full-size W8A8: 1093, 1015 and 796 ms for
    float ones, the extra channel and these int8 sums, side by side).
    """
    return torch.ones(shape, dtype=torch.int8), torch.ones(1)


def needs_weight_offset(layer: QuantConv2d | QuantLinear, form: GraphForm) -> bool:
    """Whether this layer's weights are exported as `offset_weight_codes` (OpenVINO form, 8-bit)."""
    q = layer.weight_quantizer
    return form == OPENVINO and q.bits == 8 and not fits_int8(q)


def int32_bias(layer: QuantConv2d | QuantLinear, bias: Tensor | None) -> Tensor | None:
    """The bias as int32 steps of input_scale x weight_scale, where it lies on that grid exactly."""
    if bias is None:
        return None
    step = bias_grid(layer)
    if step is None:
        return None
    k = torch.round(bias / step)
    if not torch.equal(k * step, bias) or k.abs().max() >= 2**31:
        return None
    return k.to(torch.int32)


class ExportConv2d(nn.Module):
    """A quantized conv: lowered input, DequantizeLinear(weight codes, per-channel scale), Conv.

    In the onnxruntime form an on-grid bias goes in as int32 through DequantizeLinear.
    """

    def __init__(self, layer: QuantConv2d, name: str, form: GraphForm) -> None:
        super().__init__()
        codes, scale, zero_point = weight_codes(layer, name, form)
        bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(layer.out_channels)
        # an 8-bit input is shifted into int8 (the patch embedding); OpenVINO takes uint8 where the conv pads
        shift = form != OPENVINO or not any(p != 0 for p in layer.padding)
        self.input_quantizer = lower_activation(layer.input_quantizer, f"{name}.input_quantizer",
                                                allow_shift=shift, form=form)
        if isinstance(self.input_quantizer, ShiftedActivationQDQ):
            if any(p != 0 for p in layer.padding):
                raise UserError(f"{name}: an 8-bit input shift needs a conv without padding")
            # conv(dq - shift) = conv(dq) - offset * sum(codes) * step: an integer number of bias
            # steps, so the adjusted bias stays on the int32 grid (see quant/integer_bias.py).
            step = layer.input_quantizer.scale * scale
            offset = layer.input_quantizer.zero_point - 2 ** (layer.input_quantizer.bits - 1)
            wq = layer.weight_quantizer  # the true signed codes q - zp (not the offset ones of the OpenVINO form)
            signed = wq.codes(layer.weight.detach()) - wq.zero_point.reshape(-1, 1, 1, 1)
            bias = (torch.round(bias / step) - offset * signed.float().sum(dim=(1, 2, 3))) * step
        k = int32_bias(layer, bias) if form == ONNXRUNTIME else None
        correction, sum_codes, sum_scale = None, None, None
        if needs_weight_offset(layer, form):
            if layer.groups != 1:
                raise UserError(f"{name}: 8-bit weights for OpenVINO need a conv with groups=1")
            correction = offset_weight_codes(layer, name)[2].reshape(1, -1, 1, 1)
            sum_codes, sum_scale = sum_weights((1, *codes.shape[1:]))
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("bias", bias if k is None else None)
        self.register_buffer("bias_k", k)
        self.register_buffer("bias_step", None if k is None else bias_grid(layer).detach().clone())
        self.register_buffer("correction", correction)
        self.register_buffer("sum_codes", sum_codes)
        self.register_buffer("sum_scale", sum_scale)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def forward(self, x: Tensor) -> Tensor:
        w = DQWeight.apply(self.codes, self.scale, 0, self.zero_point)
        bias = self.bias if self.bias_k is None else DQBias.apply(self.bias_k, self.bias_step)
        x = self.input_quantizer(x)
        y = F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.correction is None:
            return y
        ones = DQWeight.apply(self.sum_codes, self.sum_scale, 0, None)  # the zero-point term's sum (`sum_weights`)
        return y + F.conv2d(x, ones, None, self.stride, self.padding, self.dilation) * self.correction


class ExportLinear(nn.Module):
    """A quantized linear: lowered input @ DequantizeLinear(codes (in, out), scale, axis 1) + bias."""

    def __init__(self, layer: QuantLinear, name: str, form: GraphForm) -> None:
        super().__init__()
        codes, scale, zero_point = weight_codes(layer, name, form)
        self.input_quantizer = lower_activation(layer.input_quantizer, f"{name}.input_quantizer", form=form)
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        k = int32_bias(layer, bias) if form == ONNXRUNTIME else None
        correction = offset_weight_codes(layer, name)[2] if needs_weight_offset(layer, form) else None
        sum_codes, sum_scale = sum_weights((layer.in_features, 1)) if correction is not None else (None, None)
        self.register_buffer("sum_codes", sum_codes)
        self.register_buffer("sum_scale", sum_scale)
        self.register_buffer("codes_t", codes.t().contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("bias", bias if k is None else None)
        self.register_buffer("bias_k", k)
        self.register_buffer("bias_step", None if k is None else bias_grid(layer).detach().clone())
        self.register_buffer("correction", correction)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        y = x @ DQWeight.apply(self.codes_t, self.scale, 1, self.zero_point)
        if self.correction is not None:  # the 8-bit OpenVINO weights' zero-point term (offset_weight_codes)
            y = y + (x @ DQWeight.apply(self.sum_codes, self.sum_scale, 1, None)) * self.correction  # `sum_weights`
        if self.bias_k is not None:
            return y + DQBias.apply(self.bias_k, self.bias_step)
        return y if self.bias is None else y + self.bias


class ExportMatMul(nn.Module):
    """A quantized activation matmul: both inputs lowered by their kind."""

    def __init__(self, layer: QuantMatMul, name: str, form: GraphForm, log_sqrt2: LogSqrt2Lowering = TABLE) -> None:
        super().__init__()
        self.quantizer_a = lower_activation(layer.quantizer_a, f"{name}.quantizer_a", form=form, log_sqrt2=log_sqrt2)
        self.quantizer_b = lower_activation(layer.quantizer_b, f"{name}.quantizer_b", form=form, log_sqrt2=log_sqrt2)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.quantizer_a(a) @ self.quantizer_b(b)


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def lower_for_export(qmodel: nn.Module, form: GraphForm, log_sqrt2: LogSqrt2Lowering = TABLE) -> nn.Module:
    """A copy of a calibrated fake-quant model with every quantized layer in its export form
    (`log_sqrt2`: how the softmax quantizers are written)."""
    if form not in (TENSORRT, ONNXRUNTIME, OPENVINO):
        raise ValueError(f"unknown export form {form!r}")
    model = copy.deepcopy(qmodel).eval().cpu()
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantConv2d):
            _set_child(model, name, ExportConv2d(module, name, form))
        elif isinstance(module, QuantLinear):
            _set_child(model, name, ExportLinear(module, name, form))
        elif isinstance(module, QuantMatMul):
            _set_child(model, name, ExportMatMul(module, name, form, log_sqrt2))
    return model


def lowered_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(dotted name, lowered module) of every lowered input quantizer, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (ActivationQDQ, ShiftedActivationQDQ, ActivationU8, LogSqrt2Lowered))]
