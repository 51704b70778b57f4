"""The exact lowerings of one quantization state, and which backend gets which.

- ``tensorrt``: int8 codes with zero point 0 everywhere (TensorRT's rule); each activation's
  n-bit range is a float Clip before QuantizeLinear. No 8-bit asymmetric codes: they do not fit.
- ``onnxruntime``: uint8 activations with the quantizer's own zero point, the n-bit range
  clipped in uint8 after QuantizeLinear, int32 biases through DequantizeLinear, so that
  onnxruntime fuses `DQ -> Conv/MatMul -> Q` into its integer kernels. 8-bit fits.
- ``openvino``: the TensorRT form wherever the codes fit int8 (2..7 bits: the same graph), and
  at 8 bits what OpenVINO's int8 kernels take: activations as uint8 with their own zero point,
  weights as int8 codes q - 128 (zero point 0) plus a float correction (128 - zp) * s * sum(x)
  beside the conv or linear (`lowering.py`). OpenVINO's verdict is the float64 rule, so the
  correction's float rounding (not the codes) is what differs from fake quant.
"""

from __future__ import annotations

import onnx

from ..deploy_config import DeployConfig, OnnxRuntimeConfig, OpenVINOConfig, TensorRTConfig
from ..errors import UserError
from ..graph_targets import TARGET_CPU_KEY, GraphForm, LogSqrt2Lowering, TargetCpu

TENSORRT = GraphForm.TENSORRT
ONNXRUNTIME = GraphForm.ONNXRUNTIME
OPENVINO = GraphForm.OPENVINO
FORMS = tuple(f.value for f in GraphForm)
FORM_TITLES = {TENSORRT: "TensorRT", ONNXRUNTIME: "onnxruntime", OPENVINO: "OpenVINO"}


def form_for(deploy: DeployConfig) -> GraphForm:
    """The lowering a deploy config's backend runs exactly and fastest (OpenVINO: the one its config names)."""
    if isinstance(deploy.backend, OpenVINOConfig):
        return GraphForm(deploy.backend.graph_form)
    return TENSORRT if isinstance(deploy.backend, TensorRTConfig) else ONNXRUNTIME


def roi_nan_guard_for(deploy: DeployConfig) -> bool:
    """Whether the graph needs the RoiAlign NaN guard (export/nan_guard.py): for OpenVINO only."""
    return isinstance(deploy.backend, OpenVINOConfig)


def unshared_weights_for(deploy: DeployConfig) -> bool:
    """Whether each weight DequantizeLinear gets its own codes (export/unshared_weights.py): for OpenVINO only."""
    return isinstance(deploy.backend, OpenVINOConfig)


def log_sqrt2_lowering_for(deploy: DeployConfig) -> LogSqrt2Lowering:
    """How the graph writes the softmax quantizers: as the OpenVINO config says, else Log + table lookups."""
    return deploy.backend.log_sqrt2_lowering if isinstance(deploy.backend, OpenVINOConfig) else LogSqrt2Lowering.TABLE


def target_cpu_for(deploy: DeployConfig) -> TargetCpu:
    """The CPUs the onnxruntime form is made exact on (`deploy_config.TARGET_CPUS`); 'any' for TensorRT."""
    return deploy.backend.target_cpu if isinstance(deploy.backend, OnnxRuntimeConfig) else TargetCpu.ANY


def supported_bits(form: GraphForm) -> tuple[int, ...]:
    """Bit widths (weights and activations alike) that `form` carries exactly: the TensorRT form
    2..7 (8-bit asymmetric codes do not fit int8 with zero point 0), the others 2..8."""
    if form not in FORMS:
        raise ValueError(f"supported_bits: unknown form {form!r} (one of {', '.join(FORMS)})")
    return tuple(range(2, 8)) if form == TENSORRT else tuple(range(2, 9))


def check_export_bits(w_bits: int, a_bits: int, form: GraphForm, w_option: str = "--w-bits",
                      a_option: str = "--a-bits") -> None:
    """Refuse, before any calibration, bit widths `form` cannot carry exactly, naming the option."""
    allowed = supported_bits(form)
    for option, value in ((w_option, w_bits), (a_option, a_bits)):
        if value not in allowed:
            hint = (": use an onnxruntime deploy config (for OpenVINO: graph_form='openvino') for 8 bits"
                    if form == TENSORRT and value == 8 else "")
            raise UserError(f"{option} {value}: the {FORM_TITLES[form]} form carries {allowed[0]}..{allowed[-1]}-bit codes only"
                            f"{' (8-bit asymmetric codes do not fit int8 with zero point 0)' if form == TENSORRT else ''}"
                            f"{hint}")


def graph_form(proto: onnx.ModelProto) -> str:
    """Which form a graph has, read off its activation QuantizeLinear types: 'tensorrt' (int8),
    'onnxruntime' (uint8), 'mixed', or 'float' (no QuantizeLinear)."""
    inits = {i.name: i.data_type for i in proto.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t.data_type for n in proto.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")}
    types = set()
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        zp = node.input[2] if len(node.input) > 2 else ""
        types.add(inits.get(zp, consts.get(zp, onnx.TensorProto.UINT8)))
    if not types:
        return "float"
    if types == {onnx.TensorProto.INT8}:
        return TENSORRT
    if types == {onnx.TensorProto.UINT8}:
        return ONNXRUNTIME
    return "mixed"


def set_target_cpu(proto: onnx.ModelProto, target_cpu: str) -> None:
    """Record in the graph's metadata which CPUs it is exact on (read by runners and `check`)."""
    keep = [p for p in proto.metadata_props if p.key != TARGET_CPU_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    entry = proto.metadata_props.add()
    entry.key, entry.value = TARGET_CPU_KEY, str(target_cpu)

