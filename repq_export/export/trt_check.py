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
- ``qdq-shape``: a zero point has as many values as its scale; a per-axis scale has an axis inside
  the input's rank and one value per element along it.
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

from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto

from .graph_index import (Graph, Issue, index_graph, is_weight_dq, issue, label, node_attr, qdq_nodes,
                          quantized_type, rule_qdq_shapes, type_name, zero_point_input)

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


# ------------------------------------------------------------------------------ rules


def rule_opset(graph: Graph) -> list[Issue]:
    """Opset >= 13 for per-axis Q/DQ; >= 17 where LayerNormalization is used."""
    issues = []
    if graph.opset < MIN_OPSET:
        issues.append(Issue("<model>", "-", "opset", f"default-domain opset {graph.opset} < {MIN_OPSET}: "
                            "TensorRT's Q/DQ import needs opset 13 (per-axis scales)"))
    for node in graph.nodes:
        if node.op_type == "LayerNormalization" and graph.opset < MIN_OPSET_LAYERNORM:
            issues.append(issue(node, "opset", f"LayerNormalization needs opset >= {MIN_OPSET_LAYERNORM}, "
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
            issues.append(issue(node, "unsupported-op", f"custom domain '{node.domain}': runs only if a "
                                 f"TensorRT plugin named '{node.op_type}' is registered"))
        elif node.op_type not in TENSORRT_SUPPORTED_OPS:
            issues.append(issue(node, "unsupported-op", f"{node.op_type} is not in the TensorRT ONNX "
                                 "parser's operator support matrix"))
    return issues


def rule_topk(graph: Graph) -> list[Issue]:
    """TopK: a constant K must be <= 3840; sorted must be 1."""
    issues = []
    for node in graph.nodes:
        if node.op_type != "TopK":
            continue
        k = graph.constant(node.input[1]) if len(node.input) > 1 else np.asarray(node_attr(node, "k", 0))
        if k is not None and k.size == 1 and int(k.reshape(-1)[0]) > MAX_TOPK_K:
            issues.append(issue(node, "topk", f"K = {int(k.reshape(-1)[0])} > {MAX_TOPK_K}, "
                                 "TensorRT's TopK maximum"))
        if node_attr(node, "sorted", 1) != 1:
            issues.append(issue(node, "topk", "sorted=0 is not supported (TensorRT always sorts)"))
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
            value = node_attr(node, name, default)
            if value not in allowed:
                issues.append(issue(node, "resize", f"{name}='{value}' is not supported "
                                     f"(supported: {', '.join(sorted(allowed))})"))
        if node_attr(node, "antialias", 0):
            issues.append(issue(node, "resize", "antialias=1 is not supported"))
    return issues


def rule_zero_point(graph: Graph) -> list[Issue]:
    """Zero points: constant, all zero, signed type (TensorRT quantization is symmetric)."""
    issues = []
    for node in qdq_nodes(graph):
        name = zero_point_input(node)
        if not name:
            continue
        value = graph.constant(name)
        if value is None:
            issues.append(issue(node, "zero-point", "zero point is not a constant: TensorRT cannot check "
                                 "that it is 0", severity="warning"))
            continue
        if np.any(value.astype(np.float64) != 0):
            issues.append(issue(node, "zero-point", "zero point is not all zero: TensorRT only supports "
                                 f"symmetric quantization (nonzero values: {np.unique(value[value != 0])[:5]})"))
        elem_type = graph.types.get(name)
        if elem_type in (TensorProto.UINT8, TensorProto.UINT4):
            issues.append(issue(node, "zero-point", f"{type_name(elem_type)} zero point: TensorRT "
                                 "reinterprets it as signed, so the clamp range changes from "
                                 "[0, 2^n-1] to the signed range; use an int8 zero point 0"))
    return issues


def rule_qdq_type(graph: Graph) -> list[Issue]:
    """Quantized type INT8; INT4 only for blocked constant weights."""
    issues = []
    for node in qdq_nodes(graph):
        source = graph.producer.get(node.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            continue  # a Q -> DQ pair is judged at the QuantizeLinear
        elem_type, origin = quantized_type(graph, node)
        if elem_type == TensorProto.INT8:
            continue
        if elem_type in (TensorProto.UINT8, TensorProto.UINT4) and origin == "zero_point":
            continue  # rule_zero_point reports it
        if elem_type == TensorProto.UINT8 and origin == "default":
            issues.append(issue(node, "qdq-type", "no zero point and no output_dtype: ONNX quantizes to "
                                 "uint8 [0, 255], TensorRT to int8 [-128, 127]; add an int8 zero point 0"))
        elif elem_type == TensorProto.INT4:
            problem = _int4_problem(graph, node)
            if problem:
                issues.append(issue(node, "qdq-type", problem))
        elif elem_type is None:
            issues.append(issue(node, "qdq-type", "quantized type unknown (no zero point, untyped input)",
                                 severity="warning"))
        else:
            issues.append(issue(node, "qdq-type", f"quantized type {type_name(elem_type)}: INT8 engines "
                                 "take INT8 Q/DQ (INT4 only for block-quantized weights)"))
    return issues


def _int4_problem(graph: Graph, node: onnx.NodeProto) -> str | None:
    """Why an INT4 Q/DQ is not TensorRT's INT4 weight-only form, or None if it is."""
    if not is_weight_dq(graph, node):
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
    for node in qdq_nodes(graph):
        scale = graph.constant(node.input[1])
        if scale is None:
            issues.append(issue(node, "scale", "scale is not a build-time constant"))
        elif not np.all(np.isfinite(scale.astype(np.float64))):
            issues.append(issue(node, "scale", "scale has non-finite values"))
        elif np.any(scale <= 0):
            issues.append(issue(node, "scale", f"scale has non-positive values (min {scale.min():g}): "
                                 "TensorRT needs scales > 0"))
    return issues


def rule_per_channel(graph: Graph) -> list[Issue]:
    """Per-channel/blocked scales only on constant weights, with an explicit axis."""
    issues = []
    for node in qdq_nodes(graph):
        scale = graph.constant(node.input[1])
        if scale is None or scale.size == 1:
            continue
        if not is_weight_dq(graph, node):
            issues.append(issue(node, "per-channel", f"{scale.size} scales on an activation: TensorRT "
                                 "quantizes activations per tensor (per-channel only for constant weights)"))
        elif scale.ndim == 1 and node_attr(node, "axis") is None:
            issues.append(issue(node, "per-channel", "per-channel weight scale without an explicit axis: "
                                 "ONNX defaults to axis 1, TensorRT's parser to axis 0; write axis="))
        elif scale.ndim > 1 and quantized_type(graph, node)[0] != TensorProto.INT4:
            issues.append(issue(node, "per-channel", "block scales are supported for INT4 weights only"))
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
            issues.append(issue(node, "q-without-dq", "quantized tensor is a graph output; "
                                 "follow it by a DequantizeLinear"))
        elif others:
            names = ", ".join(f"{label(c)} ({c.op_type})" for c in others[:3])
            issues.append(issue(node, "q-without-dq", f"quantized tensor feeds {names}, not a "
                                 "DequantizeLinear"))
        elif not graph.consumers.get(output):
            issues.append(issue(node, "q-without-dq", "QuantizeLinear output is unused", "warning"))
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
        if not (is_weight_dq(graph, node) or (source is not None and source.op_type == "QuantizeLinear")):
            continue
        for consumer in _compute_consumers(graph, node.output[0], {node.output[0]}):
            if consumer is None:
                issues.append(issue(node, "qdq-placement", "dequantized tensor is a graph output",
                                     severity="warning"))
            elif consumer.op_type not in QDQ_FUSING_OPS:
                issues.append(issue(node, "qdq-placement", f"feeds {label(consumer)} ({consumer.op_type}): "
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
            issues.append(issue(node, "layernorm-decomposed", "layer norm decomposed into ReduceMean/Sub/"
                                 "Pow: export with opset >= 17 to get one LayerNormalization op "
                                 "(the decomposed form overflows in FP16 engines)", severity="warning"))
    return issues


RULES: tuple[Callable[[Graph], list[Issue]], ...] = (
    rule_opset,
    rule_unsupported_ops,
    rule_topk,
    rule_resize,
    rule_qdq_shapes,
    rule_zero_point,
    rule_qdq_type,
    rule_scale,
    rule_per_channel,
    rule_q_without_dq,
    rule_qdq_placement,
    rule_layernorm_decomposed,
)
