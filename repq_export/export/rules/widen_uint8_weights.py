"""Rule `widen_uint8_weights` (target CPU 'vnni' only, instead of `split_uint8_weights`).

An 8-bit weight (uint8 codes q, uint8 zero point per channel) is stored as int8 codes q - 128
with int8 zero points zp - 128: the same q - zp, so DequantizeLinear gives the same values, but
onnxruntime multiplies it on one u8s8 kernel (QLinearConv, MatMulIntegerToFloat with per-column
zero points) instead of two halves. Full-range int8 weights saturate the u8s8 kernels of AVX2
CPUs without VNNI, so a graph with them is marked for target CPU 'vnni'
(`forms.set_target_cpu`) and its runner refuses other CPUs. Exact only where u8s8 kernels cannot
saturate (VNNI, AMX, ARM64), which the runner checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..graph_edit import GraphEdit
from ..graph_index import Graph, zero_point_input
from .rule import Rule


@dataclass(frozen=True)
class WeightMatch:
    """One weight's uint8 codes and its per-channel uint8 zero point (initializer names)."""

    codes: str
    zero_point: str


def _is_uint8(graph: Graph, name: str, rank: int | None = None) -> bool:
    """Whether `name` is a uint8 initializer (of rank `rank`, or of rank above 1 where None)."""
    value = graph.constant(name)
    if value is None or graph.types.get(name) != TensorProto.UINT8 or name not in graph.initializers:
        return False
    return value.ndim == rank if rank is not None else value.ndim > 1


def pattern(graph: Graph) -> list[WeightMatch]:
    """Every weight DequantizeLinear's uint8 codes (rank > 1) and uint8 zero point (rank 1), once each."""
    matches: dict[str, WeightMatch] = {}
    for node in graph.nodes:
        if node.op_type != "DequantizeLinear":
            continue
        codes, zp = node.input[0], zero_point_input(node)
        if codes not in matches and _is_uint8(graph, codes) and zp and _is_uint8(graph, zp, rank=1):
            matches[codes] = WeightMatch(codes, zp)
    return list(matches.values())


def _weight_reader_problem(graph: Graph, codes: str, zp: str) -> str | None:
    """Why a reader of `codes` is not a DequantizeLinear of `codes` with zero point `zp`, or None."""
    for reader in graph.consumers.get(codes, []):
        if reader.op_type != "DequantizeLinear" or reader.input[0] != codes or zero_point_input(reader) != zp:
            return f"{reader.op_type} node {reader.name or reader.output[0]!r} reads {codes!r} otherwise"
    return None


def check(graph: Graph, m: WeightMatch) -> str | None:
    """Why the weight keeps its uint8 codes: a reader of its codes or of its zero point would see
    changed values (only weight DequantizeLinear nodes, each of them widened too, may read them)."""
    problem = _weight_reader_problem(graph, m.codes, m.zero_point)
    if problem:
        return problem
    for reader in graph.consumers.get(m.zero_point, []):
        other = reader.input[0]
        if reader.op_type != "DequantizeLinear" or zero_point_input(reader) != m.zero_point or not _is_uint8(graph, other):
            return f"{reader.op_type} node {reader.name or reader.output[0]!r} reads the zero point {m.zero_point!r}"
        problem = _weight_reader_problem(graph, other, m.zero_point)
        if problem:
            return f"the zero point is shared with a weight that stays: {problem}"
    return None


def rewrite(edit: GraphEdit, m: WeightMatch) -> None:
    """Codes and zero point minus 128, as int8 (from the indexed values: a zero point shared by
    several weights is written once more with the same values)."""
    for name in (m.codes, m.zero_point):
        value = edit.graph.constant(name).astype(np.int16) - 128
        edit.set_initializer(name, value.astype(np.int8))


WIDEN_UINT8_WEIGHTS = Rule("widen_uint8_weights", pattern, check, rewrite)
