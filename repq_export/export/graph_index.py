"""An index of an ONNX graph for static checks: constants, producers, consumers, element types,
and the ``Issue`` every rule reports. Shared by the TensorRT rules (``trt_check.py``) and the
onnxruntime-form rules (``ort_check.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

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
    types: dict[str, int] = field(default_factory=dict)  # TensorProto element type by name
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)
    folded_values: dict[str, np.ndarray] = field(default_factory=dict)  # cache of `folded`

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def is_constant(self, name: str) -> bool:
        return bool(name) and name in self.constants

    def folded(self, name: str, max_nodes: int = 16) -> np.ndarray | None:
        """The value of `name` where it is a constant or a small expression of constants only
        (onnxruntime folds those when a session opens), evaluated with ONNX's reference runtime."""
        if not name or name in self.constants:
            return self.constant(name)
        if name in self.folded_values:
            return self.folded_values[name]
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
        leaves = {i for n in nodes for i in n.input if i in self.constants}
        model = onnx.helper.make_model(onnx.helper.make_graph(
            nodes, "folded", [], [onnx.helper.make_empty_tensor_value_info(name)],
            [numpy_helper.from_array(self.constants[i], i) for i in sorted(leaves)]), opset_imports=self.model.opset_import)
        from onnx.reference import ReferenceEvaluator

        self.folded_values[name] = value = ReferenceEvaluator(model).run(None, {})[0]
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
