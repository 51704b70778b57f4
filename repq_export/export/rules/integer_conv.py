"""Rule `integer_conv`: a quantized conv whose output stays float, as im2col on the integer codes.

onnxruntime fuses `DQ -> Conv (-> Relu) -> Q` into QLinearConv only where exactly one
QuantizeLinear reads the conv; a conv read by RoiAlign, an Add, a ConvTranspose or by two
quantizers (the RPN's shared conv) runs as a float conv on dequantized weights, slower than the
float model. This rule writes it as NHWC Transpose, Pad with the zero point's code (padding with
0.0, as the conv does), one Gather of the kh*kw taps' pixels and `DQ -> MatMul` over (kh*kw*C, K)
weight codes, which `integer_matmul` then puts on an integer kernel. (Cloning the RPN conv once
per quantizer, so that each clone fuses into a QLinearConv, measured about 120 ms slower at
800x1216 on one thread than one im2col.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..graph_edit import GraphEdit
from ..graph_index import Graph, node_attr, zero_point_input
from .rule import Rule


@dataclass
class ConvMatch:
    """A conv of dequantized activation and weight codes: its nodes and its weight codes."""

    conv: onnx.NodeProto
    x_dq: onnx.NodeProto
    w_dq: onnx.NodeProto
    weight: np.ndarray | None  # (K, C, kh, kw) weight codes, None where not a constant


def pattern(graph: Graph) -> list[ConvMatch]:
    """Every Conv whose input and weight both come from DequantizeLinear (a quantized conv)."""
    matches = []
    for conv in graph.nodes:
        if conv.op_type != "Conv":
            continue
        x_dq, w_dq = (graph.producer.get(name) for name in conv.input[:2])
        if all(p is not None and p.op_type == "DequantizeLinear" for p in (x_dq, w_dq)):
            matches.append(ConvMatch(conv, x_dq, w_dq, graph.constant(w_dq.input[0])))
    return matches


def _conv_chain(graph: Graph, conv: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The conv and, where the conv's only reader is a Relu, that Relu."""
    readers = graph.consumers.get(conv.output[0], [])
    if len(readers) == 1 and readers[0].op_type == "Relu" and conv.output[0] not in graph.outputs:
        return [conv, readers[0]]
    return [conv]


def check(graph: Graph, m: ConvMatch) -> str | None:
    """Why the conv is left as it is: not a stride-1, ungrouped, undilated conv of uint8 activation
    codes and constant per-output-channel weight codes, or one onnxruntime fuses already."""
    x_zp = graph.constant(zero_point_input(m.x_dq))
    if m.weight is None or m.weight.ndim != 4:
        return "the weight is not a constant 4-D tensor of codes"
    if x_zp is None or x_zp.size != 1:
        return "the input's zero point is not one constant"
    if graph.types.get(zero_point_input(m.x_dq)) != TensorProto.UINT8:
        return "the input's codes are not uint8"
    if node_attr(m.w_dq, "axis", 1) != 0:
        return "the weight is not quantized per output channel (axis 0)"
    if node_attr(m.conv, "group", 1) != 1:
        return "a grouped conv"
    if node_attr(m.conv, "auto_pad", "NOTSET") != "NOTSET":
        return "auto_pad is set"
    if any(s != 1 for s in node_attr(m.conv, "strides", [1, 1])):
        return "stride other than 1"
    if any(d != 1 for d in node_attr(m.conv, "dilations", [1, 1])):
        return "dilation other than 1"
    readers = graph.consumers.get(_conv_chain(graph, m.conv)[-1].output[0], [])
    if len(readers) == 1 and readers[0].op_type == "QuantizeLinear" and m.weight.dtype != np.uint8:
        return "onnxruntime fuses it into a QLinearConv already (one quantizer reads it, int8 weights)"
    return None


def rewrite(edit: GraphEdit, m: ConvMatch) -> None:
    """NHWC codes -> Pad(zero point) -> Gather of the kh*kw taps -> DQ -> MatMul over (kh*kw*C, K)
    weight codes (+ bias) -> NCHW, writing the conv's own output name."""
    name, (k_out, c_in, kh, kw) = m.conv.name or m.conv.output[0], m.weight.shape
    codes, scale, zp = m.x_dq.input[0], m.x_dq.input[1], zero_point_input(m.x_dq)
    nodes = [helper.make_node("Transpose", [codes], [f"{name}/nhwc"], name=f"{name}/nhwc", perm=[0, 2, 3, 1])]
    cols = f"{name}/nhwc"
    top, left, bottom, right = list(node_attr(m.conv, "pads", [0, 0, 0, 0]))[:4]
    if any((top, left, bottom, right)):
        pads = edit.add_initializer(f"{name}/pads", np.array([0, top, left, 0, 0, bottom, right, 0], np.int64))
        nodes.append(helper.make_node("Pad", [cols, pads, zp], [f"{name}/padded"], name=f"{name}/pad", mode="constant"))
        cols = f"{name}/padded"
    if kh * kw > 1:
        nodes += _gather_taps(edit, name, cols, kh, kw, c_in)
        cols = f"{name}/im2col"
    nodes.append(helper.make_node("DequantizeLinear", [cols, scale, zp], [f"{name}/cols_dq"], name=f"{name}/cols_dq"))
    # (kh, kw, C) order along the rows, as the Gather lays the taps out
    matrix = np.ascontiguousarray(m.weight.transpose(2, 3, 1, 0).reshape(kh * kw * c_in, k_out))
    # named after the conv's weight, so the calls of a shared conv (the RPN's, once per level) share it
    w_inputs = [edit.add_initializer(f"{m.w_dq.input[0]}/im2col", matrix), m.w_dq.input[1]]
    if zero_point_input(m.w_dq):
        w_inputs.append(zero_point_input(m.w_dq))
    nodes.append(helper.make_node("DequantizeLinear", w_inputs, [f"{name}/weight_dq"], name=f"{name}/weight_dq", axis=1))
    nodes.append(helper.make_node("MatMul", [f"{name}/cols_dq", f"{name}/weight_dq"], [f"{name}/matmul"],
                                  name=f"{name}/matmul"))
    out = f"{name}/matmul"
    if len(m.conv.input) > 2 and m.conv.input[2]:
        nodes.append(helper.make_node("Add", [out, m.conv.input[2]], [f"{name}/bias"], name=f"{name}/bias"))
        out = f"{name}/bias"
    nodes.append(helper.make_node("Transpose", [out], [m.conv.output[0]], name=f"{name}/nchw", perm=[0, 3, 1, 2]))
    edit.replace(m.conv, nodes)


def _gather_taps(edit: GraphEdit, name: str, padded: str, kh: int, kw: int, channels: int) -> list[onnx.NodeProto]:
    """im2col of NHWC codes (N, Hp, Wp, C) as one Gather of whole pixels: row (n, h, w) of the
    result holds pixels (n, h + i, w + j) for every tap (i, j), so `{name}/im2col` is
    (N, H, W, kh*kw*C).

    The pixel indices (n * Hp + h + i) * Wp + (w + j) are computed from the shape at run time
    (batch, height and width stay dynamic: the mask head's convs see one image per RoI). One
    Gather copying C-byte rows, parallel over rows, was 1.3-1.7x faster than kh*kw Slices and a
    Concat at 200x304x256 (onnxruntime 1.32, 1-2 threads), with the same matrix."""
    def node(op: str, inputs: list[str], out: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{name}/{out}"], name=f"{name}/{out}", **attrs)

    def const(suffix: str, value) -> str:
        return edit.add_initializer(f"{name}/{suffix}", np.array(value, np.int64))

    taps_i, taps_j = np.divmod(np.arange(kh * kw, dtype=np.int64), kw)  # tap t = (i, j), row-major
    return [
        node("Shape", [padded], "shape"),
        node("Gather", [f"{name}/shape", const("axis0", 0)], "n", axis=0),
        node("Gather", [f"{name}/shape", const("axis1", 1)], "hp", axis=0),
        node("Gather", [f"{name}/shape", const("axis2", 2)], "wp", axis=0),
        node("Sub", [f"{name}/hp", const("kh_1", kh - 1)], "h"),
        node("Sub", [f"{name}/wp", const("kw_1", kw - 1)], "w"),
        # every -1 of the index reshapes below stands beside 1s only: inferred from 0 images too
        node("Range", [const("zero", 0), f"{name}/n", const("one", 1)], "images"),
        node("Mul", [f"{name}/images", f"{name}/hp"], "image_rows"),
        node("Reshape", [f"{name}/image_rows", const("as_n", [-1, 1, 1, 1])], "image_index"),
        node("Range", [const("zero", 0), f"{name}/h", const("one", 1)], "rows"),
        node("Range", [const("zero", 0), f"{name}/w", const("one", 1)], "cols"),
        node("Reshape", [f"{name}/rows", const("as_h", [1, -1, 1, 1])], "row_in_image"),
        node("Add", [f"{name}/image_index", f"{name}/row_in_image"], "row"),  # n * Hp + h
        node("Mul", [f"{name}/row", f"{name}/wp"], "row_index"),
        node("Reshape", [f"{name}/cols", const("as_w", [1, 1, -1, 1])], "col_index"),
        node("Mul", [const("taps_i", taps_i), f"{name}/wp"], "tap_rows"),
        node("Add", [f"{name}/tap_rows", const("taps_j", taps_j)], "tap_offsets"),
        node("Reshape", [f"{name}/tap_offsets", const("as_t", [1, 1, 1, -1])], "tap_index"),
        node("Add", [f"{name}/row_index", f"{name}/col_index"], "pixel_index"),
        node("Add", [f"{name}/pixel_index", f"{name}/tap_index"], "index"),  # (N, H, W, kh*kw)
        # -1 is the only unknown dim and C > 0, so it is inferred even from 0 elements (no RoI)
        node("Reshape", [padded, const("as_pixels", [-1, channels])], "pixels"),
        node("Gather", [f"{name}/pixels", f"{name}/index"], "taps", axis=0),  # (N, H, W, kh*kw, C)
        # the row width is written out: a -1 beside a copied 0 (N = 0 RoIs) cannot be inferred
        node("Reshape", [f"{name}/taps", const("as_rows", [0, 0, 0, kh * kw * channels])], "im2col"),
    ]


INTEGER_CONV = Rule("integer_conv", pattern, check, rewrite)
