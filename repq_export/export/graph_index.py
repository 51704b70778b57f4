"""An index of an ONNX graph for static checks: constants, producers, consumers, element types,
and the ``Issue`` every rule reports. Shared by the TensorRT rules (``trt_check.py``) and the
onnxruntime-form rules (``ort_check.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .const_eval import FoldRefused, evaluate

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Issue:
    """One violated rule at one node. severity 'error': the build fails or results differ
    from onnxruntime; 'warning': it builds but not as intended (e.g. unfused Q/DQ)."""

    node: str
    op: str
    rule: str
    message: str
    severity: str = "error"


@dataclass
class Graph:
    """Index of a model's main graph: constants, producers, consumers and element types."""

    model: onnx.ModelProto
    opset: int
    nodes: list[onnx.NodeProto]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    initializers: set[str] = field(default_factory=set)  # the constants stored as initializers
    types: dict[str, int] = field(default_factory=dict)  # TensorProto element type by name
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)
    folded_values: dict[str, np.ndarray] = field(default_factory=dict)  # cache of `folded`
    fold_refusals: dict[str, str] = field(default_factory=dict)  # why `folded` gave None for a name

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def is_constant(self, name: str) -> bool:
        return bool(name) and name in self.constants

    def folded(self, name: str, max_nodes: int = 16) -> np.ndarray | None:
        """The value of `name` where it is a constant or a small expression of constants only
        (onnxruntime folds those when a session opens), evaluated within an element budget and
        without control flow (``const_eval``); None where it is not, the reason in ``fold_refusals``."""
        if not name or name in self.constants:
            return self.constant(name)
        if name in self.folded_values:
            return self.folded_values[name]
        if name in self.fold_refusals:
            return None
        ids, stack = set(), [name]
        while stack:
            value = stack.pop()
            if value in self.constants:
                continue
            node = self.producer.get(value)
            if node is None or len(ids) >= max_nodes:
                return None  # a graph input, or too large to be a weight expression
            if id(node) not in ids:
                ids.add(id(node))
                stack.extend(i for i in node.input if i)
        nodes = [n for n in self.nodes if id(n) in ids]  # graph order is topological
        try:
            value = evaluate(nodes, self.constant, self.model.opset_import, name)
        except FoldRefused as refused:
            self.fold_refusals[name] = str(refused)
            return None
        self.folded_values[name] = value
        return value


def index_graph(model: onnx.ModelProto) -> Graph:
    """Collect what the rules need from the main graph (types via ONNX shape inference)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a help for typing, not a requirement
        inferred = model
    g = inferred.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = Graph(model=model, opset=opset, nodes=list(model.graph.node))
    for info in list(g.input) + list(g.output) + list(g.value_info):
        if info.type.HasField("tensor_type"):
            graph.types[info.name] = info.type.tensor_type.elem_type
    for init in model.graph.initializer:
        graph.constants[init.name] = numpy_helper.to_array(init)
        graph.initializers.add(init.name)
        graph.types[init.name] = init.data_type
    for node in graph.nodes:
        for name in node.output:
            graph.producer[name] = node
        for name in node.input:
            if name:
                graph.consumers.setdefault(name, []).append(node)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            _add_constant_node(graph, node)
    graph.outputs = {out.name for out in model.graph.output}
    return graph


def _add_constant_node(graph: Graph, node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.name == "value":
            graph.constants[node.output[0]] = numpy_helper.to_array(attr.t)
            graph.types[node.output[0]] = attr.t.data_type
        elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = onnx.helper.get_attribute_value(attr)
            is_float = attr.name.startswith("value_float")
            graph.constants[node.output[0]] = np.asarray(value, np.float32 if is_float else np.int64)
            graph.types[node.output[0]] = TensorProto.FLOAT if is_float else TensorProto.INT64


def label(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def node_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def issue(node: onnx.NodeProto, rule: str, message: str, severity: str = "error") -> Issue:
    return Issue(node=label(node), op=node.op_type, rule=rule, message=message, severity=severity)


def type_name(elem_type: int | None) -> str:
    return "unknown" if not elem_type else TensorProto.DataType.Name(elem_type)


def qdq_nodes(graph: Graph) -> list[onnx.NodeProto]:
    return [n for n in graph.nodes if n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx")]


def zero_point_input(node: onnx.NodeProto) -> str:
    return node.input[2] if len(node.input) > 2 else ""


def quantized_type(graph: Graph, node: onnx.NodeProto) -> tuple[int | None, str]:
    """The integer type a Q/DQ node works in, and where that came from
    ('output_dtype', 'zero_point', 'input' or 'default')."""
    zero_point = zero_point_input(node)
    if node.op_type == "QuantizeLinear":
        if node_attr(node, "output_dtype", 0):
            return node_attr(node, "output_dtype"), "output_dtype"
        if zero_point:
            return graph.types.get(zero_point), "zero_point"
        return TensorProto.UINT8, "default"
    source = node.input[0]
    if source in graph.types:
        return graph.types[source], "input"
    producer = graph.producer.get(source)
    if producer is not None and producer.op_type == "QuantizeLinear":
        return quantized_type(graph, producer)[0], "input"
    return (graph.types.get(zero_point), "zero_point") if zero_point else (None, "input")


def is_weight_dq(graph: Graph, node: onnx.NodeProto) -> bool:
    return node.op_type == "DequantizeLinear" and graph.is_constant(node.input[0])


def qdq_shape_problem(graph: Graph, node: onnx.NodeProto) -> str | None:
    """Why a Q/DQ node's constant scale, zero point and input do not fit together (onnx.checker does
    not look at values), or None: zero point as many values as the scale; a per-axis scale with an
    axis inside the input's rank and one value per element along it."""
    scale = graph.constant(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        return None
    zero_point = graph.constant(zero_point_input(node))
    if zero_point is not None and zero_point.size != scale.size:
        return f"zero point has {zero_point.size} value(s), the scale {scale.size}"
    data = graph.constant(node.input[0])
    if scale.ndim != 1 or data is None:
        return None
    axis = node_attr(node, "axis", 1)
    if not -data.ndim <= axis < data.ndim:
        return f"axis {axis} is outside the input's rank {data.ndim}"
    if scale.size != 1 and scale.size != data.shape[axis]:
        return f"{scale.size} per-axis scales for axis {axis} of length {data.shape[axis]}"
    return None


def rule_qdq_shapes(graph: Graph) -> list[Issue]:
    """Every Q/DQ node's scale, zero point and axis fit its input (``qdq_shape_problem``)."""
    issues = []
    for node in qdq_nodes(graph):
        problem = qdq_shape_problem(graph, node)
        if problem:
            issues.append(issue(node, "qdq-shape", problem))
    return issues
