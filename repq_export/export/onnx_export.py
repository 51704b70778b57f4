"""Write the detector (float or calibrated fake quant) as one ONNX graph at the network boundary."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..boundary import INPUT_NAMES, OUTPUT_NAMES
from ..deploy_config import OnnxConfig
from ..files import write_atomically
from ..graph_targets import GraphForm, LogSqrt2Lowering, TargetCpu
from ..quant.layers import named_quantizers
from ..quantizer_calls import store_calls
from .forms import ONNXRUNTIME, set_target_cpu
from .locations import locate_calls
from .nan_guard import guard_roi_align_nans
from .lowering import lower_for_export
from .rewrites import optimize_for_onnxruntime, refresh_calls
from .unshared_weights import unshare_weight_codes


def trace_to_onnx(model: nn.Module, img: torch.Tensor, img_hw: torch.Tensor, cfg: OnnxConfig) -> onnx.ModelProto:
    """Trace `model` (already in export form) with torch's TorchScript exporter; no file written.

    The TorchScript exporter (dynamo=False) is used because it carries our Q/DQ symbolics and
    torchvision's NonMaxSuppression / RoiAlign lowerings, and records shape arithmetic so that
    height and width stay dynamic.
    """
    buffer = io.BytesIO()
    # a static export (input_shape) has no image axes here, yet keeps the detections' count dynamic
    dynamic_axes = {k: dict(v) for k, v in cfg.dynamic_axes.items()} or None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (img, img_hw), buffer, dynamo=False, opset_version=cfg.opset_version,
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    inline_constant_identities(proto)
    proto.producer_name = "repq-export"
    return proto


def inline_constant_identities(proto: onnx.ModelProto) -> None:
    """Drop the Identity nodes the exporter puts on de-duplicated initializers.

    torch shares equal tensors (two quantizers calibrated on the same input get equal scales)
    through Identity nodes; TensorRT wants Q/DQ scales to be initializers, so consumers are
    pointed at the initializer itself.
    """
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in outputs}
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def export_onnx(model: nn.Module, path: str | Path, img: torch.Tensor, img_hw: torch.Tensor,
                cfg: OnnxConfig | None = None, *, form: GraphForm, target_cpu: TargetCpu = TargetCpu.ANY,
                roi_nan_guard: bool = False, log_sqrt2: LogSqrt2Lowering = LogSqrt2Lowering.TABLE,
                unshared_weights: bool = False) -> onnx.ModelProto:
    """Lower `model` (fake-quant or float) in `form` and write it to `path`: checked, then renamed
    into place. A quantized graph carries its quantizer-call table (`quantizer_calls.py`); the
    onnxruntime form also gets the integer-conv rewrites (`rewrites.py`) for `target_cpu`
    (`deploy_config.TARGET_CPUS`); the graph's metadata records the target it needs ('vnni' only
    where 8-bit weights were widened). `roi_nan_guard` moves the RoIs of zero width or height
    before every RoiAlign out of the image (`nan_guard.py`; OpenVINO deploy configs); `log_sqrt2` picks how the softmax
    quantizers are written (`graph_targets.LogSqrt2Lowering`; 'bisect' for OpenVINO deploy configs);
    `unshared_weights` gives each weight DequantizeLinear its own codes (`unshared_weights.py`; OpenVINO).

    The same model and example input give a byte-identical file.
    """
    cfg = cfg or OnnxConfig(dynamic_axes={"img": {2: "height", 3: "width"},
                                          **{name: {0: "num_dets"} for name in OUTPUT_NAMES}})
    quantized = any(True for _ in named_quantizers(model))
    export_model = lower_for_export(model, form, log_sqrt2) if quantized else model.eval().cpu()
    proto = trace_to_onnx(export_model, img.cpu(), img_hw.cpu(), cfg)
    if quantized:
        calls = locate_calls(proto, export_model)
        if form == ONNXRUNTIME:  # every quantized conv onto an integer kernel (rewrites.py)
            needed = optimize_for_onnxruntime(proto, target_cpu)
            calls = refresh_calls(proto, calls)
            set_target_cpu(proto, needed)
        store_calls(proto, calls)
    if roi_nan_guard:
        guard_roi_align_nans(proto)
    if unshared_weights:
        unshare_weight_codes(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:  # a bug of ours, not of the user's input
        raise RuntimeError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    write_model(proto, path)
    return proto


def write_model(proto: onnx.ModelProto, path: str | Path) -> None:
    """Serialize to `path` through a temporary name, so no half-written file is ever left."""
    write_atomically(path, proto.SerializeToString())


def count_qdq(proto: onnx.ModelProto) -> dict[str, int]:
    """Numbers of QuantizeLinear and DequantizeLinear nodes, and of int8 / uint8 weight initializers."""
    ops = [n.op_type for n in proto.graph.node]

    def weights(dtype: int) -> int:
        return sum(1 for i in proto.graph.initializer if i.data_type == dtype and len(i.dims) > 1)
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear"),
            "int8_weights": weights(onnx.TensorProto.INT8), "uint8_weights": weights(onnx.TensorProto.UINT8)}
