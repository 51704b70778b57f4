"""Static check of an onnxruntime-form graph: what keeps it exact on onnxruntime's integer kernels.

Rules, with their ``rule`` id (each an error: the graph would compute something else than fake
quant, or an integer kernel could saturate):

- ``act-type``: an activation QuantizeLinear is uint8 with a constant scalar zero point.
- ``act-chain``: a QuantizeLinear output feeds only a Clip with constant uint8 bounds lo <= hi
  (the n-bit range), ops that move codes without changing them (Transpose, Slice, Reshape, a
  Concat of this quantizer's codes only, a Pad with its zero point, a Gather taking the codes as
  its data, never as indices: the im2col of an integer conv), Shape (reads no value) and
  DequantizeLinear or MatMulIntegerToFloat nodes (codes as its A input); each of those
  uses the QuantizeLinear's own scale and zero point, so codes come back as fake quant's values.
- ``u8s8-saturation``: an int8 weight (of a DequantizeLinear or a MatMulIntegerToFloat) has
  codes within +-64. onnxruntime's u8s8 kernels on AVX2
  CPUs without VNNI add two uint8 x int8 products in int16 (vpmaddubsw): 2 x 255 x 64 = 32640
  fits, larger weight codes could saturate and change results on such CPUs only. 8-bit weights
  are stored as uint8 with per-channel zero points and multiplied as two int8 halves hi, lo
  (codes - zp = 16 hi + lo, `rules/split_uint8_weights.py`), each within +-16; the rule reads
  them through their folded expression. A graph exported for target CPU 'vnni' (its metadata,
  `graph_targets.TARGET_CPU_KEY`) keeps 8-bit weights as full-range int8 instead: this rule does not
  apply to it, and its runner refuses CPUs whose u8s8 kernels could saturate.
- ``qdq-shape``: as in ``trt_check``: zero point and scale of one size, per-axis scales that fit.
- ``weight-path``: weight codes computed by control flow (Loop, Scan, If), an op ``const_eval`` does
  not take, or past its element budget: check does not run them, and says so.
- ``bias-type``: a DequantizeLinear of an int32 constant (a bias) has zero point 0.
- ``target-cpu``: the graph's recorded target CPU is one this version knows.
- ``empty-reshape``: no Reshape has a constant shape with -1 beside a 0 (copy that input dim).
  With a 0 there (the mask head's batch when an image has no detection) the other dims multiply
  to 0 and onnxruntime cannot infer -1: the graph would fail on every image without a detection.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ..deploy_config import TARGET_CPUS, TARGET_VNNI
from ..graph_targets import graph_target_cpu
from .lowering import INT16_MAX, U8S8_SAFE_WEIGHT
from .graph_index import Graph, Issue, index_graph, issue, node_attr, rule_qdq_shapes, zero_point_input

UINT8_MAX = 255
#: ops that only move codes (the im2col of `rules/integer_conv.py`): values pass through unchanged
CODE_MOVES = ("Transpose", "Slice", "Reshape")


def check_onnxruntime_form(model: onnx.ModelProto) -> list[Issue]:
    """Run every onnxruntime-form rule on ``model``; an empty list means none is broken."""
    graph = index_graph(model)
    issues: list[Issue] = []
    rules = [rule_qdq_shapes, rule_activation_type, rule_activation_chain, rule_weight_path, rule_u8s8_saturation,
             rule_bias_type, rule_empty_reshape]
    if graph_target_cpu(model) == TARGET_VNNI:
        rules.remove(rule_u8s8_saturation)
    for rule in rules:
        issues.extend(rule(graph))
    target = graph_target_cpu(model)
    if target not in TARGET_CPUS:
        issues.append(Issue(node="(graph metadata)", op="-", rule="target-cpu", message=f"unknown target CPU "
                            f"{target!r}: runners refuse it (known: {', '.join(TARGET_CPUS)})"))
    return issues


def _same(graph: Graph, a: str, b: str) -> bool:
    if a == b:
        return True
    x, y = graph.constant(a), graph.constant(b)
    return x is not None and y is not None and x.shape == y.shape and bool(np.array_equal(x, y))


def rule_activation_type(graph: Graph) -> list[Issue]:
    issues = []
    for node in graph.nodes:
        if node.op_type != "QuantizeLinear":
            continue
        zp = zero_point_input(node)
        value = graph.constant(zp)
        if value is None or graph.types.get(zp) != TensorProto.UINT8 or value.size != 1:
            issues.append(issue(node, "act-type", "activation QuantizeLinear must have a constant scalar "
                                 "uint8 zero point"))
    return issues


def rule_activation_chain(graph: Graph) -> list[Issue]:
    issues = []
    for q in (n for n in graph.nodes if n.op_type == "QuantizeLinear"):
        reached, seen, concats = {q.output[0]}, set(), []
        frontier = list(graph.consumers.get(q.output[0], []))
        while frontier:
            node = frontier.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Clip":
                lo, hi = (graph.constant(node.input[i]) if len(node.input) > i else None for i in (1, 2))
                if lo is None or hi is None or lo.size != 1 or hi.size != 1:
                    issues.append(issue(node, "act-chain", "Clip after QuantizeLinear needs constant scalar uint8 "
                                         "bounds lo <= hi"))
                elif not 0 <= int(lo.reshape(-1)[0]) <= int(hi.reshape(-1)[0]) <= UINT8_MAX or graph.types.get(
                        node.input[1]) != TensorProto.UINT8:
                    issues.append(issue(node, "act-chain", "Clip after QuantizeLinear needs constant uint8 "
                                         "bounds lo <= hi"))
            elif node.op_type == "DequantizeLinear":
                if not (_same(graph, node.input[1], q.input[1]) and _same(graph, zero_point_input(node), zero_point_input(q))):
                    issues.append(issue(node, "act-chain", f"DequantizeLinear after {q.name or q.output[0]} must "
                                         "use that QuantizeLinear's scale and zero point"))
                continue
            elif node.op_type == "MatMulIntegerToFloat":
                if node.input[0] not in reached or node.input[1] in reached or not (
                        _same(graph, node.input[2], q.input[1]) and len(node.input) > 4
                        and _same(graph, node.input[4], zero_point_input(q))):
                    issues.append(issue(node, "act-chain", f"MatMulIntegerToFloat after {q.name or q.output[0]} "
                                         "must take its codes as A, with that QuantizeLinear's scale and zero "
                                         "point"))
                continue
            elif node.op_type == "Pad":
                if node_attr(node, "mode", "constant") != "constant" or len(node.input) < 3 or not _same(
                        graph, node.input[2], zero_point_input(q)):
                    issues.append(issue(node, "act-chain", f"Pad of the codes of {q.name or q.output[0]} must pad "
                                         "with its zero point (the code of 0.0)"))
            elif node.op_type == "Concat":
                concats.append(node)
            elif node.op_type == "Shape":
                continue  # the codes' shape only (the im2col's pixel indices)
            elif node.op_type == "Gather":
                if node.input[1] in reached:
                    issues.append(issue(node, "act-chain", f"Gather indexes with the codes of {q.name or q.output[0]}"
                                         ": codes may only be moved"))
                    continue
            elif node.op_type not in CODE_MOVES:
                issues.append(issue(node, "act-chain", f"consumes the codes of {q.name or q.output[0]}: only "
                                     f"Clip(uint8), DequantizeLinear and moves ({', '.join(CODE_MOVES)}, Pad, "
                                     "Concat, Gather) may"))
                continue
            reached.update(node.output)
            frontier.extend(c for name in node.output for c in graph.consumers.get(name, []))
        for node in concats:
            if any(name not in reached for name in node.input):
                issues.append(issue(node, "act-chain", f"Concat joins the codes of {q.name or q.output[0]} with "
                                     "other values"))
    return issues


def _codes_input(node: onnx.NodeProto) -> tuple[str, str, int] | None:
    """(codes, zero point, axis) inputs of a node that multiplies by weight codes, if it is one."""
    if node.op_type == "DequantizeLinear":
        return node.input[0], zero_point_input(node), _axis(node)
    if node.op_type == "MatMulIntegerToFloat" and len(node.input) > 1:
        return node.input[1], node.input[5] if len(node.input) > 5 else "", 1
    return None


def _weight_codes(graph: Graph, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """(int8 weight codes, their zero point, its axis in range) that `node` multiplies by, if any; None
    also where the zero point does not fit the codes (``rule_qdq_shapes`` reports that)."""
    found = _codes_input(node)
    if found is None:
        return None
    codes, zp, axis = found
    value = graph.folded(codes)  # a constant, or derived from one (`rules/split_uint8_weights.py`)
    if value is None or value.dtype != np.int8 or value.ndim < 2:
        return None
    zero_point = graph.constant(zp)
    if not -value.ndim <= axis < value.ndim:
        return None
    axis %= value.ndim
    if zero_point is not None and zero_point.size not in (1, value.shape[axis]):
        return None
    return value, zero_point, axis


def rule_weight_path(graph: Graph) -> list[Issue]:
    """Weight codes computed by an expression check does not evaluate (control flow, over budget)."""
    issues = []
    for node in graph.nodes:
        found = _codes_input(node)
        if found is None or graph.is_constant(found[0]) or found[0] not in graph.producer:
            continue
        graph.folded(found[0])
        if found[0] in graph.fold_refusals:
            issues.append(issue(node, "weight-path", f"its weight is not a constant expression check can read: "
                                 f"{graph.fold_refusals[found[0]]}"))
    return issues


def rule_u8s8_saturation(graph: Graph) -> list[Issue]:
    issues = []
    for node in graph.nodes:
        found = _weight_codes(graph, node)
        if found is None:
            continue
        codes, zp, axis = found
        signed = codes.astype(np.int64) - (0 if zp is None else zp.astype(np.int64).reshape(
            [-1 if i == axis else 1 for i in range(codes.ndim)] if zp.size > 1 else []))
        peak = int(np.abs(signed).max()) if signed.size else 0
        if peak > U8S8_SAFE_WEIGHT:
            issues.append(issue(node, "u8s8-saturation", f"int8 weight codes reach {peak}: 2 x 255 x {peak} = "
                                 f"{2 * UINT8_MAX * peak} > {INT16_MAX} can saturate u8s8 kernels on AVX2 "
                                 "without VNNI; store them as uint8 with a zero point"))
    return issues


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def rule_bias_type(graph: Graph) -> list[Issue]:
    issues = []
    for node in graph.nodes:
        if node.op_type == "DequantizeLinear" and graph.types.get(node.input[0]) == TensorProto.INT32:
            zp = graph.constant(zero_point_input(node))
            if zp is not None and np.any(zp):
                issues.append(issue(node, "bias-type", "an int32 bias must have zero point 0"))
    return issues


def rule_empty_reshape(graph: Graph) -> list[Issue]:
    """Reshapes that fail on a tensor of 0 elements: a constant shape with both -1 and a copied 0."""
    issues = []
    for node in graph.nodes:
        if node.op_type != "Reshape" or len(node.input) < 2 or node_attr(node, "allowzero", 0):
            continue
        shape = graph.constant(node.input[1])
        if shape is not None and shape.ndim == 1 and -1 in shape.tolist() and 0 in shape.tolist():
            issues.append(issue(node, "empty-reshape", f"shape {shape.tolist()} cannot infer -1 from a tensor of "
                                 "0 elements (the mask head gets 0 RoIs on an image without detections); "
                                 "write the dim out"))
    return issues


def format_ort_report(issues: list[Issue]) -> str:
    """A count line, then one line per issue."""
    if not issues:
        return "onnxruntime form: no issues found"
    lines = [f"onnxruntime form: {len(issues)} error(s)"]
    lines += [f"  {i.severity:7s} [{i.rule}] {i.node} ({i.op}): {i.message}" for i in issues]
    return "\n".join(lines)
