"""Reading the value of a graph's constant expression safely: a budget of elements, no control flow.

``check`` reads weights that the exporter stores as a small expression of constants (e.g. the two
halves of `rules/split_uint8_weights.py`). A graph from elsewhere may put anything there: a `Loop`
of 10^12 trips, an `Expand` to 10^12 elements. Each node is evaluated alone, in graph order, after
its output size has been predicted from its inputs; only the ops below are taken, and the
expression is refused (``FoldRefused``, with the reason) past ``MAX_ELEMENTS`` in one output or
``MAX_WORK`` over all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

MAX_ELEMENTS = 1 << 26  # one output: 64 Mi elements (Swin-S's largest weight has 2.4 Mi)
MAX_WORK = 1 << 28  # all outputs of one expression together

SAME_SIZE = frozenset({"Identity", "Cast", "CastLike", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                       "Neg", "Abs", "Round", "Floor", "Ceil", "Sign", "Relu", "Clip", "Not", "Sqrt", "Reciprocal",
                       "QuantizeLinear", "DequantizeLinear", "Slice", "Split"})
BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Min", "Max", "Sum", "Mean", "And", "Or", "Xor",
                       "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Where", "BitShift",
                       "BitwiseAnd", "BitwiseOr", "BitwiseXor"})
OTHER = frozenset({"Concat", "Gather", "GatherElements", "Shape", "Size", "Expand", "Tile", "ConstantOfShape",
                   "Range", "Constant"})
FOLDABLE_OPS = SAME_SIZE | BROADCAST | OTHER


class FoldRefused(Exception):
    """The expression is not one ``check`` evaluates (control flow, an unknown op, over budget)."""


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    """An integer attribute of `node`, or `default`."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _broadcast(shapes: Sequence[tuple[int, ...]]) -> int:
    """Elements of the broadcast of `shapes`, computed from the shapes alone."""
    try:
        return math.prod(np.broadcast_shapes(*shapes))
    except ValueError:
        raise FoldRefused(f"shapes {', '.join(map(str, shapes))} do not broadcast") from None


def _ints(value: np.ndarray) -> list[int]:
    """A shape or repeat vector as Python ints (no overflow in products)."""
    return [int(v) for v in np.asarray(value).reshape(-1)]


def predicted_elements(node: onnx.NodeProto, inputs: Sequence[np.ndarray | None]) -> int:
    """The number of elements ``node`` will output (summed over its outputs), from its input values."""
    op, present = node.op_type, [x for x in inputs if x is not None]
    if op in SAME_SIZE:
        return present[0].size if present else 0
    if op in BROADCAST:
        return _broadcast([x.shape for x in present])
    if op == "Concat":
        return sum(x.size for x in present)
    if op == "Gather":
        data, indices = inputs[0], inputs[1]
        axis = _attr(node, "axis", 0) % max(data.ndim, 1)
        per_index = data.size // data.shape[axis] if data.ndim and data.shape[axis] else 0
        return indices.size * per_index
    if op == "GatherElements":
        return inputs[1].size
    if op in ("Shape", "Size"):
        return 16
    if op == "Expand":
        return _broadcast([inputs[0].shape, tuple(max(d, 0) for d in _ints(inputs[1]))])
    if op == "Tile":
        return inputs[0].size * math.prod(max(r, 0) for r in _ints(inputs[1]))
    if op == "ConstantOfShape":
        return math.prod(max(d, 0) for d in _ints(inputs[0]))
    if op == "Range":
        start, limit, delta = (float(np.asarray(x).reshape(-1)[0]) for x in inputs[:3])
        if delta == 0 or not all(math.isfinite(v) for v in (start, limit, delta)):
            raise FoldRefused("Range with a zero or non-finite step")
        return max(math.ceil((limit - start) / delta), 0)
    if op == "Constant":
        return 0  # its value is already in the file
    raise FoldRefused(f"{op} is not an op check evaluates")


def evaluate(nodes: Sequence[onnx.NodeProto], constants: Callable[[str], np.ndarray | None],
             opset_imports: Sequence[onnx.OperatorSetIdProto], name: str) -> np.ndarray:
    """The value of ``name`` computed by ``nodes`` (graph order) from constants; FoldRefused if that
    would take control flow, an op outside FOLDABLE_OPS or more than the element budget."""
    values: dict[str, np.ndarray] = {}
    work = 0
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in FOLDABLE_OPS:
            what = "control flow" if node.op_type in ("Loop", "Scan", "If") else "not an op check evaluates"
            raise FoldRefused(f"{node.op_type} node {node.name or node.output[0]!r} ({what}) computes it")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise FoldRefused(f"{node.op_type} node {node.name!r} carries a subgraph")
        inputs = [values[i] if i in values else constants(i) if i else None for i in node.input]
        if any(x is None for i, x in zip(node.input, inputs) if i):
            raise FoldRefused(f"{node.op_type} node {node.name!r} reads a value that is not a constant")
        size = predicted_elements(node, inputs)
        work += size
        if size > MAX_ELEMENTS or work > MAX_WORK:
            raise FoldRefused(f"{node.op_type} node {node.name or node.output[0]!r} would make {size} elements "
                              f"(budget {MAX_ELEMENTS} an output, {MAX_WORK} in all)")
        values.update(zip(node.output, _run(node, inputs, opset_imports)))
    if name not in values:
        raise FoldRefused(f"{name!r} is not computed by its expression")
    return values[name]


def _run(node: onnx.NodeProto, inputs: Sequence[np.ndarray | None],
         opset_imports: Sequence[onnx.OperatorSetIdProto]) -> list[np.ndarray]:
    """One node through ONNX's reference runtime, its inputs given as initializers."""
    from onnx.reference import ReferenceEvaluator

    feeds = [numpy_helper.from_array(np.asarray(x), n) for n, x in zip(node.input, inputs) if n and x is not None]
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    model = helper.make_model(helper.make_graph([node], "fold", [], outputs, feeds), opset_imports=opset_imports)
    try:
        return list(ReferenceEvaluator(model).run(None, {}))
    except Exception as err:  # noqa: BLE001 - a malformed node of a foreign graph: report, never crash
        raise FoldRefused(f"{node.op_type} node {node.name!r} cannot be evaluated ({type(err).__name__}: "
                          f"{str(err)[:80]})") from None
