"""Static check of an ONNX graph against TensorRT's documented rules, without TensorRT.

An engine build takes minutes and needs a GPU; most reasons it fails (or silently computes
something else than onnxruntime) can be read off the graph. Each rule below is one function
``rule_*(graph) -> list[Issue]``; ``check_tensorrt_compat`` runs them all.

Sources: the onnx-tensorrt operator support matrix (docs/operators.md, TensorRT 10.x) and its
Q/DQ importer, and TensorRT's developer guide (explicit quantization, quantization schemes,
Q/DQ placement recommendations). Rules, with their ``rule`` id:

- ``opset``: default-domain opset >= 13 (per-axis Q/DQ); >= 17 when LayerNormalization is used.
- ``unsupported-op``: the op is not in onnx-tensorrt's support matrix (or is a custom-domain op:
  only a TensorRT plugin registered under that name could run it).
- ``topk``: a constant K must be <= 3840 and ``sorted`` must be 1. A K computed in the graph
  (``min(K, n)``) is accepted by TensorRT 10 as a shape tensor and is not flagged.
- ``resize``: only nearest/linear modes, the documented coordinate-transformation and nearest
  modes, no antialiasing, aspect-ratio policy 'stretch'.
- ``zero-point``: zero points must be constant, all zero, and not uint8/uint4 (TensorRT
  reinterprets a uint8 zero point as int8: the range [0, 255] becomes [-128, 127]).
- ``qdq-type``: the quantized type must be INT8; INT4 only on a DequantizeLinear of a constant
  weight with block scales (block 64 or 128 along one of the last two axes). A QuantizeLinear
  without zero point and output_dtype is uint8 in ONNX (int8 in TensorRT): flagged.
- ``scale``: scales must be build-time constants, finite and > 0.
- ``per-channel``: per-channel (or blocked) scales only on DequantizeLinear of a constant
  weight; such a DequantizeLinear must give ``axis`` explicitly (ONNX defaults to axis 1, the
  TensorRT parser to axis 0).
- ``q-without-dq``: every QuantizeLinear output must feed DequantizeLinear nodes only.
- ``qdq-placement`` (warning): following the DequantizeLinear output through data-movement ops
  (Reshape, Transpose, Slice, Concat, MaxPool, ...), the first compute op should be one that
  TensorRT fuses with Q/DQ: Conv, ConvTranspose, MatMul, Gemm (the "quantize all inputs of
  weighted operations" recommendation), Add (quantized residual input) or AveragePool.
  Elsewhere the pair still builds, but runs as separate scale layers in float.
- ``layernorm-decomposed`` (warning): a ReduceMean/Sub/Pow/ReduceMean layer-norm pattern; export
  with opset 17 so LayerNorm is one LayerNormalization op (FP16 engines overflow otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# onnx-tensorrt 10.x docs/operators.md, rows marked "Y" (ops supported by the ONNX parser).
TENSORRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad
ParametricSoftplus Pow QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign
Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

MAX_TOPK_K = 3840
MIN_OPSET = 13
MIN_OPSET_LAYERNORM = 17
INT4_BLOCK_SIZES = (64, 128)

# Ops that only move data: TensorRT propagates DQ forward / Q backward across them.
QDQ_PASSTHROUGH_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                                 "Slice", "Split", "Concat", "Identity", "MaxPool", "GlobalMaxPool"})
# Ops TensorRT fuses with the DQ on their inputs into an INT8 kernel.
QDQ_FUSING_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Add",
                            "AveragePool", "GlobalAveragePool"})

RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDINATE_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                           "asymmetric", "align_corners"}
RESIZE_NEAREST_MODES = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


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

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def is_constant(self, name: str) -> bool:
        return bool(name) and name in self.constants


def check_tensorrt_compat(model: onnx.ModelProto) -> list[Issue]:
    """Run every rule on ``model``; an empty list means no known TensorRT problem."""
    graph = index_graph(model)
    issues: list[Issue] = []
    for rule in RULES:
        issues.extend(rule(graph))
    return issues


def format_report(issues: Iterable[Issue]) -> str:
    """A human-readable report: a count line, then errors before warnings, one per line."""
    issues = sorted(issues, key=lambda issue: (issue.severity != "error", issue.rule, issue.node))
    errors = sum(issue.severity == "error" for issue in issues)
    if not issues:
        return "TensorRT compatibility: no issues found"
    lines = [f"TensorRT compatibility: {errors} error(s), {len(issues) - errors} warning(s)"]
    lines += [f"  {issue.severity:7s} [{issue.rule}] {issue.node} ({issue.op}): {issue.message}"
              for issue in issues]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ index


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


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _issue(node: onnx.NodeProto, rule: str, message: str, severity: str = "error") -> Issue:
    return Issue(node=_label(node), op=node.op_type, rule=rule, message=message, severity=severity)


def _type_name(elem_type: int | None) -> str:
    return "unknown" if not elem_type else TensorProto.DataType.Name(elem_type)


def _qdq_nodes(graph: Graph) -> list[onnx.NodeProto]:
    return [n for n in graph.nodes if n.op_type in _QDQ_OPS and n.domain in ("", "ai.onnx")]


def _zero_point(node: onnx.NodeProto) -> str:
    return node.input[2] if len(node.input) > 2 else ""


def quantized_type(graph: Graph, node: onnx.NodeProto) -> tuple[int | None, str]:
    """The integer type a Q/DQ node works in, and where that came from
    ('output_dtype', 'zero_point', 'input' or 'default')."""
    zero_point = _zero_point(node)
    if node.op_type == "QuantizeLinear":
        if _attr(node, "output_dtype", 0):
            return _attr(node, "output_dtype"), "output_dtype"
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


def _is_weight_dq(graph: Graph, node: onnx.NodeProto) -> bool:
    return node.op_type == "DequantizeLinear" and graph.is_constant(node.input[0])


# ------------------------------------------------------------------------------ rules


def rule_opset(graph: Graph) -> list[Issue]:
    """Opset >= 13 for per-axis Q/DQ; >= 17 where LayerNormalization is used."""
    issues = []
    if graph.opset < MIN_OPSET:
        issues.append(Issue("<model>", "-", "opset", f"default-domain opset {graph.opset} < {MIN_OPSET}: "
                            "TensorRT's Q/DQ import needs opset 13 (per-axis scales)"))
    for node in graph.nodes:
        if node.op_type == "LayerNormalization" and graph.opset < MIN_OPSET_LAYERNORM:
            issues.append(_issue(node, "opset", f"LayerNormalization needs opset >= {MIN_OPSET_LAYERNORM}, "
                                 f"the model declares {graph.opset}"))
    return issues


def _all_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterable[onnx.NodeProto]:
    """Nodes of a graph and of its If/Loop/Scan subgraphs."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subgraphs:
                yield from _all_nodes(sub.node)


def rule_unsupported_ops(graph: Graph) -> list[Issue]:
    """Ops outside onnx-tensorrt's support matrix, and custom-domain ops."""
    issues = []
    for node in _all_nodes(graph.nodes):
        if node.domain not in ("", "ai.onnx"):
            issues.append(_issue(node, "unsupported-op", f"custom domain '{node.domain}': runs only if a "
                                 f"TensorRT plugin named '{node.op_type}' is registered"))
        elif node.op_type not in TENSORRT_SUPPORTED_OPS:
            issues.append(_issue(node, "unsupported-op", f"{node.op_type} is not in the TensorRT ONNX "
                                 "parser's operator support matrix"))
    return issues


def rule_topk(graph: Graph) -> list[Issue]:
    """TopK: a constant K must be <= 3840; sorted must be 1."""
    issues = []
    for node in graph.nodes:
        if node.op_type != "TopK":
            continue
        k = graph.constant(node.input[1]) if len(node.input) > 1 else np.asarray(_attr(node, "k", 0))
        if k is not None and k.size == 1 and int(k.reshape(-1)[0]) > MAX_TOPK_K:
            issues.append(_issue(node, "topk", f"K = {int(k.reshape(-1)[0])} > {MAX_TOPK_K}, "
                                 "TensorRT's TopK maximum"))
        if _attr(node, "sorted", 1) != 1:
            issues.append(_issue(node, "topk", "sorted=0 is not supported (TensorRT always sorts)"))
    return issues


def rule_resize(graph: Graph) -> list[Issue]:
    """Resize: only the modes the TensorRT parser documents."""
    issues = []
    for node in graph.nodes:
        if node.op_type != "Resize":
            continue
        checks = (("mode", "nearest", RESIZE_MODES),
                  ("coordinate_transformation_mode", "half_pixel", RESIZE_COORDINATE_MODES),
                  ("nearest_mode", "round_prefer_floor", RESIZE_NEAREST_MODES),
                  ("keep_aspect_ratio_policy", "stretch", {"stretch"}))
        for name, default, allowed in checks:
            value = _attr(node, name, default)
            if value not in allowed:
                issues.append(_issue(node, "resize", f"{name}='{value}' is not supported "
                                     f"(supported: {', '.join(sorted(allowed))})"))
        if _attr(node, "antialias", 0):
            issues.append(_issue(node, "resize", "antialias=1 is not supported"))
    return issues


def rule_zero_point(graph: Graph) -> list[Issue]:
    """Zero points: constant, all zero, signed type (TensorRT quantization is symmetric)."""
    issues = []
    for node in _qdq_nodes(graph):
        name = _zero_point(node)
        if not name:
            continue
        value = graph.constant(name)
        if value is None:
            issues.append(_issue(node, "zero-point", "zero point is not a constant: TensorRT cannot check "
                                 "that it is 0", severity="warning"))
            continue
        if np.any(value.astype(np.float64) != 0):
            issues.append(_issue(node, "zero-point", "zero point is not all zero: TensorRT only supports "
                                 f"symmetric quantization (nonzero values: {np.unique(value[value != 0])[:5]})"))
        elem_type = graph.types.get(name)
        if elem_type in (TensorProto.UINT8, TensorProto.UINT4):
            issues.append(_issue(node, "zero-point", f"{_type_name(elem_type)} zero point: TensorRT "
                                 "reinterprets it as signed, so the clamp range changes from "
                                 "[0, 2^n-1] to the signed range; use an int8 zero point 0"))
    return issues


def rule_qdq_type(graph: Graph) -> list[Issue]:
    """Quantized type INT8; INT4 only for blocked constant weights."""
    issues = []
    for node in _qdq_nodes(graph):
        source = graph.producer.get(node.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            continue  # a Q -> DQ pair is judged at the QuantizeLinear
        elem_type, origin = quantized_type(graph, node)
        if elem_type == TensorProto.INT8:
            continue
        if elem_type in (TensorProto.UINT8, TensorProto.UINT4) and origin == "zero_point":
            continue  # rule_zero_point reports it
        if elem_type == TensorProto.UINT8 and origin == "default":
            issues.append(_issue(node, "qdq-type", "no zero point and no output_dtype: ONNX quantizes to "
                                 "uint8 [0, 255], TensorRT to int8 [-128, 127]; add an int8 zero point 0"))
        elif elem_type == TensorProto.INT4:
            problem = _int4_problem(graph, node)
            if problem:
                issues.append(_issue(node, "qdq-type", problem))
        elif elem_type is None:
            issues.append(_issue(node, "qdq-type", "quantized type unknown (no zero point, untyped input)",
                                 severity="warning"))
        else:
            issues.append(_issue(node, "qdq-type", f"quantized type {_type_name(elem_type)}: INT8 engines "
                                 "take INT8 Q/DQ (INT4 only for block-quantized weights)"))
    return issues


def _int4_problem(graph: Graph, node: onnx.NodeProto) -> str | None:
    """Why an INT4 Q/DQ is not TensorRT's INT4 weight-only form, or None if it is."""
    if not _is_weight_dq(graph, node):
        return "INT4 is weight-only in TensorRT: only a DequantizeLinear of a constant weight may be INT4"
    weight, scale = graph.constant(node.input[0]), graph.constant(node.input[1])
    if scale is None or scale.ndim != weight.ndim:
        return "INT4 weights need block scales (scale of the weight's rank, one blocked axis)"
    blocked = [axis for axis in range(weight.ndim) if scale.shape[axis] != weight.shape[axis]]
    if len(blocked) != 1:
        return f"INT4 weights need exactly one blocked axis (scale {scale.shape}, weight {weight.shape})"
    axis = blocked[0]
    block = weight.shape[axis] // max(scale.shape[axis], 1)
    if block not in INT4_BLOCK_SIZES or axis < weight.ndim - 2:
        return (f"INT4 block size {block} along axis {axis}: TensorRT takes blocks of "
                f"{INT4_BLOCK_SIZES} along one of the last two axes")
    return None


def rule_scale(graph: Graph) -> list[Issue]:
    """Scales: build-time constants, finite, strictly positive."""
    issues = []
    for node in _qdq_nodes(graph):
        scale = graph.constant(node.input[1])
        if scale is None:
            issues.append(_issue(node, "scale", "scale is not a build-time constant"))
        elif not np.all(np.isfinite(scale.astype(np.float64))):
            issues.append(_issue(node, "scale", "scale has non-finite values"))
        elif np.any(scale <= 0):
            issues.append(_issue(node, "scale", f"scale has non-positive values (min {scale.min():g}): "
                                 "TensorRT needs scales > 0"))
    return issues


def rule_per_channel(graph: Graph) -> list[Issue]:
    """Per-channel/blocked scales only on constant weights, with an explicit axis."""
    issues = []
    for node in _qdq_nodes(graph):
        scale = graph.constant(node.input[1])
        if scale is None or scale.size == 1:
            continue
        if not _is_weight_dq(graph, node):
            issues.append(_issue(node, "per-channel", f"{scale.size} scales on an activation: TensorRT "
                                 "quantizes activations per tensor (per-channel only for constant weights)"))
        elif scale.ndim == 1 and _attr(node, "axis") is None:
            issues.append(_issue(node, "per-channel", "per-channel weight scale without an explicit axis: "
                                 "ONNX defaults to axis 1, TensorRT's parser to axis 0; write axis="))
        elif scale.ndim > 1 and quantized_type(graph, node)[0] != TensorProto.INT4:
            issues.append(_issue(node, "per-channel", "block scales are supported for INT4 weights only"))
    return issues


def rule_q_without_dq(graph: Graph) -> list[Issue]:
    """Every QuantizeLinear output goes to DequantizeLinear nodes (and nowhere else)."""
    issues = []
    for node in graph.nodes:
        if node.op_type != "QuantizeLinear":
            continue
        output = node.output[0]
        others = [c for c in graph.consumers.get(output, []) if c.op_type != "DequantizeLinear"]
        if output in graph.outputs:
            issues.append(_issue(node, "q-without-dq", "quantized tensor is a graph output; "
                                 "follow it by a DequantizeLinear"))
        elif others:
            names = ", ".join(f"{_label(c)} ({c.op_type})" for c in others[:3])
            issues.append(_issue(node, "q-without-dq", f"quantized tensor feeds {names}, not a "
                                 "DequantizeLinear"))
        elif not graph.consumers.get(output):
            issues.append(_issue(node, "q-without-dq", "QuantizeLinear output is unused", "warning"))
    return issues


def _compute_consumers(graph: Graph, tensor: str, seen: set[str]) -> list[onnx.NodeProto | None]:
    """The first non-data-movement consumers of ``tensor`` (None marks a graph output)."""
    found: list[onnx.NodeProto | None] = [None] if tensor in graph.outputs else []
    for consumer in graph.consumers.get(tensor, []):
        if consumer.op_type in QDQ_PASSTHROUGH_OPS:
            for output in consumer.output:
                if output and output not in seen:
                    seen.add(output)
                    found += _compute_consumers(graph, output, seen)
        else:
            found.append(consumer)
    return found


def rule_qdq_placement(graph: Graph) -> list[Issue]:
    """DQ outputs should reach an op TensorRT fuses with Q/DQ (weighted ops, residual Add)."""
    issues = []
    for node in graph.nodes:
        if node.op_type != "DequantizeLinear":
            continue
        source = graph.producer.get(node.input[0])
        if not (_is_weight_dq(graph, node) or (source is not None and source.op_type == "QuantizeLinear")):
            continue
        for consumer in _compute_consumers(graph, node.output[0], {node.output[0]}):
            if consumer is None:
                issues.append(_issue(node, "qdq-placement", "dequantized tensor is a graph output",
                                     severity="warning"))
            elif consumer.op_type not in QDQ_FUSING_OPS:
                issues.append(_issue(node, "qdq-placement", f"feeds {_label(consumer)} ({consumer.op_type}): "
                                     "TensorRT fuses Q/DQ into Conv/ConvTranspose/MatMul/Gemm/Add/AveragePool; "
                                     "here it runs as separate float scale layers", severity="warning"))
    return issues


def rule_layernorm_decomposed(graph: Graph) -> list[Issue]:
    """Sub(x, ReduceMean(x)) -> Pow/Mul -> ReduceMean: a layer norm spelled out in primitives."""
    issues = []
    for node in graph.nodes:
        if node.op_type != "Sub" or len(node.input) != 2:
            continue
        mean = graph.producer.get(node.input[1])
        if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != node.input[0]:
            continue
        squares = [c for c in graph.consumers.get(node.output[0], [])
                   if c.op_type == "Pow" or (c.op_type == "Mul" and c.input[0] == c.input[1])]
        if any(c.op_type == "ReduceMean" for s in squares for c in graph.consumers.get(s.output[0], [])):
            issues.append(_issue(node, "layernorm-decomposed", "layer norm decomposed into ReduceMean/Sub/"
                                 "Pow: export with opset >= 17 to get one LayerNormalization op "
                                 "(the decomposed form overflows in FP16 engines)", severity="warning"))
    return issues


RULES: tuple[Callable[[Graph], list[Issue]], ...] = (
    rule_opset,
    rule_unsupported_ops,
    rule_topk,
    rule_resize,
    rule_zero_point,
    rule_qdq_type,
    rule_scale,
    rule_per_channel,
    rule_q_without_dq,
    rule_qdq_placement,
    rule_layernorm_decomposed,
)
