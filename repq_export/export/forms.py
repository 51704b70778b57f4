"""The two exact lowerings of one quantization state, and which backend gets which.

- ``tensorrt``: int8 codes with zero point 0 everywhere (TensorRT's rule); each activation's
  n-bit range is a float Clip before QuantizeLinear. No 8-bit asymmetric codes: they do not fit.
- ``onnxruntime``: uint8 activations with the quantizer's own zero point, the n-bit range
  clipped in uint8 after QuantizeLinear, int32 biases through DequantizeLinear, so that
  onnxruntime fuses `DQ -> Conv/MatMul -> Q` into its integer kernels. 8-bit fits.
"""

from __future__ import annotations

import onnx

from ..deploy_config import DeployConfig, TensorRTConfig
from ..errors import UserError

TENSORRT = "tensorrt"
ONNXRUNTIME = "onnxruntime"
FORMS = (TENSORRT, ONNXRUNTIME)


def form_for(deploy: DeployConfig) -> str:
    """The lowering a deploy config's backend runs exactly and fastest."""
    return TENSORRT if isinstance(deploy.backend, TensorRTConfig) else ONNXRUNTIME


def check_bits_for_form(form: str, w_bits: int, a_bits: int, where: str = "") -> None:
    """Refuse, before any calibration, bit widths the form cannot carry exactly."""
    if form == TENSORRT and max(w_bits, a_bits) >= 8:
        raise UserError(f"{where or 'export'}: the TensorRT form carries 2..7-bit codes only "
                        f"(8-bit asymmetric codes do not fit int8 with zero point 0); got W{w_bits}A{a_bits}: "
                        "use an onnxruntime deploy config for 8 bits")


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
