"""Rule `split_uint8_weights`: a product on 8-bit weight codes as two on narrow int8 halves.

onnxruntime runs uint8 x uint8 products on slow kernels (about 4x slower than uint8 x int8 here);
the int8 codes of 8-bit weights (q - zp reaches +-255) do not fit int8, and even shifted by 128
would saturate the u8s8 kernels of AVX2 CPUs without VNNI. So each MatMulIntegerToFloat on uint8
weight codes with a zero point per column becomes two on int8 codes,
A @ (codes - zp) = 16 (A @ hi) + (A @ lo), added in float, with hi and lo within +-16.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..graph_edit import MS_DOMAIN, GraphEdit
from ..graph_index import Graph
from .rule import Rule


def pattern(graph: Graph) -> list[onnx.NodeProto]:
    """Every MatMulIntegerToFloat on constant weight codes."""
    return [n for n in graph.nodes if n.op_type == "MatMulIntegerToFloat" and graph.is_constant(n.input[1])]


def check(graph: Graph, mm: onnx.NodeProto) -> str | None:
    """Why the product is left as it is: its weight codes are not uint8 with a zero point per column."""
    if graph.types.get(mm.input[1]) != TensorProto.UINT8:
        return "the weight codes are not uint8 (one narrow product already)"
    if len(mm.input) <= 5 or not mm.input[5]:
        return "the weight has no zero point"
    if graph.constant(mm.input[3]) is None:
        return "the weight's scale is not a constant"
    return None


def _split_expression(codes: str, zp: str, edit: GraphEdit) -> list[onnx.NodeProto]:
    """Nodes computing int8 `{codes}/hi`, `{codes}/lo` with codes - zp = 16 hi + lo from the stored uint8 codes and
    their per-column zero points: lo = (codes - zp) mod 16 in 0..15, hi = (codes - zp - lo) / 16 in
    -16..15. Kept as an expression so the file stores the weight once; onnxruntime folds it when
    the session opens."""
    def node(op: str, inputs: list[str], out: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{codes}/{out}"], name=f"{codes}/{out}", **attrs)

    sixteen = edit.add_initializer(f"{codes}/sixteen", np.array(16, np.int16))
    nodes = [node("Cast", [codes], "i16", to=TensorProto.INT16),
             node("Cast", [zp], "zp_i16", to=TensorProto.INT16),
             node("Sub", [f"{codes}/i16", f"{codes}/zp_i16"], "signed"),
             node("Mod", [f"{codes}/signed", sixteen], "lo_i16", fmod=0),
             node("Sub", [f"{codes}/signed", f"{codes}/lo_i16"], "hi_x16"),
             node("Div", [f"{codes}/hi_x16", sixteen], "hi_i16"),
             node("Cast", [f"{codes}/hi_i16"], "hi", to=TensorProto.INT8),
             node("Cast", [f"{codes}/lo_i16"], "lo", to=TensorProto.INT8)]
    return nodes


def rewrite(edit: GraphEdit, mm: onnx.NodeProto) -> None:
    """Two MatMulIntegerToFloat (hi with the scale times 16 and the bias, lo) and their Add; hi and
    lo are computed just before their first reader, so the graph order stays topological."""
    codes, scale, zp = mm.input[1], mm.input[3], mm.input[5]
    hi, lo = f"{codes}/hi", f"{codes}/lo"
    # a weight several products share is split once, before its first reader
    expression = [] if edit.writes(hi) else _split_expression(codes, zp, edit)
    scale16 = edit.add_initializer(f"{scale}/x16", edit.graph.constant(scale) * np.float32(16))  # exact: 2^4
    name, out, bias = mm.name or mm.output[0], mm.output[0], list(mm.input[6:7])
    a = [mm.input[0]]
    edit.replace(mm, expression + [
        helper.make_node("MatMulIntegerToFloat", a + [hi, mm.input[2], scale16, mm.input[4], ""] + bias,
                         [f"{out}/hi"], name=f"{name}/hi", domain=MS_DOMAIN),
        helper.make_node("MatMulIntegerToFloat", a + [lo, mm.input[2], scale, mm.input[4]], [f"{out}/lo"],
                         name=f"{name}/lo", domain=MS_DOMAIN),
        helper.make_node("Add", [f"{out}/hi", f"{out}/lo"], [out], name=f"{name}/hi_plus_lo")])


SPLIT_UINT8_WEIGHTS = Rule("split_uint8_weights", pattern, check, rewrite)
