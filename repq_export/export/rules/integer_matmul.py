"""Rule `integer_matmul`: a quantized MatMul whose output stays float, as one MatMulIntegerToFloat.

The linears and the im2col convs of `integer_conv` are `DQ -> MatMul (-> Add bias)` on constant
weight codes. onnxruntime forms MatMulIntegerToFloat from `DQ -> MatMul` itself, but leaves the
bias Add as one more pass over the output; this rule puts the bias inside the op.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..graph_edit import MS_DOMAIN, GraphEdit
from ..graph_index import Graph, node_attr, zero_point_input
from .rule import Rule


@dataclass
class MatMulMatch:
    """A MatMul of two dequantized inputs, and the Add that adds a constant bias to it (if any)."""

    matmul: onnx.NodeProto
    x_dq: onnx.NodeProto
    w_dq: onnx.NodeProto
    bias: np.ndarray | None
    add: onnx.NodeProto | None


def _constant_bias(graph: Graph, name: str, width: int) -> np.ndarray | None:
    """A float32 (width,) bias constant, or DequantizeLinear of an int32 one, as float32 values."""
    value = graph.constant(name)
    producer = graph.producer.get(name)
    if value is None and producer is not None and producer.op_type == "DequantizeLinear":
        k, step = graph.constant(producer.input[0]), graph.constant(producer.input[1])
        zp = graph.constant(zero_point_input(producer))
        if k is None or step is None or k.dtype != np.int32 or (zp is not None and np.any(zp)):
            return None
        value = k.astype(np.float32) * step.astype(np.float32)  # what DequantizeLinear computes
    if value is None or value.dtype != np.float32 or value.shape != (width,):
        return None
    return value


def _bias_add(graph: Graph, matmul: onnx.NodeProto, width: int) -> tuple[np.ndarray | None, onnx.NodeProto | None]:
    """The MatMul's only reader where it is an Add of a constant (width,) bias, with that bias."""
    readers = graph.consumers.get(matmul.output[0], [])
    if len(readers) == 1 and readers[0].op_type == "Add":
        add = readers[0]
        other = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
        bias = _constant_bias(graph, other, width)
        if bias is not None:
            return bias, add
    return None, None


def pattern(graph: Graph) -> list[MatMulMatch]:
    """Every MatMul of two DequantizeLinear outputs, with its bias Add where one follows."""
    matches = []
    for matmul in graph.nodes:
        if matmul.op_type != "MatMul":
            continue
        x_dq, w_dq = (graph.producer.get(name) for name in matmul.input[:2])
        if any(p is None or p.op_type != "DequantizeLinear" for p in (x_dq, w_dq)):
            continue
        weight = graph.constant(w_dq.input[0])
        width = weight.shape[1] if weight is not None and weight.ndim == 2 else -1
        matches.append(MatMulMatch(matmul, x_dq, w_dq, *_bias_add(graph, matmul, width)))
    return matches


def check(graph: Graph, m: MatMulMatch) -> str | None:
    """Why the MatMul is left as it is: not uint8 codes with a scalar scale and zero point times
    constant 2-D weight codes with a per-column or scalar scale, a graph output, or fused already."""
    x_zp, weight = zero_point_input(m.x_dq), graph.constant(m.w_dq.input[0])
    if graph.types.get(x_zp) != TensorProto.UINT8:
        return "the input's codes are not uint8"
    if graph.constant(x_zp) is None or graph.constant(x_zp).size != 1:
        return "the input's zero point is not one constant"
    scale = graph.constant(m.w_dq.input[1])
    if weight is None or weight.ndim != 2:
        return "the weight is not a constant 2-D tensor of codes"
    if scale is None or graph.constant(m.x_dq.input[1]) is None:
        return "a scale is not a constant"
    if scale.size != 1 and (node_attr(m.w_dq, "axis", 1) not in (1, -1) or scale.shape != (weight.shape[1],)):
        return "the weight's scale is neither scalar nor one per column"
    if m.matmul.output[0] in graph.outputs:
        return "its output is a graph output"
    readers = graph.consumers.get(m.matmul.output[0], [])
    if len(readers) == 1 and readers[0].op_type == "QuantizeLinear" and weight.dtype != np.uint8:
        return "onnxruntime fuses it into a QLinearMatMul already (one quantizer reads it, int8 weights)"
    return None


def rewrite(edit: GraphEdit, m: MatMulMatch) -> None:
    """One com.microsoft MatMulIntegerToFloat on the codes, with the bias inside."""
    name = m.matmul.name or m.matmul.output[0]
    inputs = [m.x_dq.input[0], m.w_dq.input[0], m.x_dq.input[1], m.w_dq.input[1], zero_point_input(m.x_dq),
              zero_point_input(m.w_dq)]
    out = m.matmul.output[0]
    if m.bias is not None:
        inputs.append(edit.add_initializer(f"{name}/bias", m.bias))
        out = m.add.output[0]
        edit.remove(m.add)
    edit.replace(m.matmul, [helper.make_node("MatMulIntegerToFloat", inputs, [out], name=f"{name}/integer",
                                             domain=MS_DOMAIN)])
    edit.use_domain(MS_DOMAIN)


INTEGER_MATMUL = Rule("integer_matmul", pattern, check, rewrite)
