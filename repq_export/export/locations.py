"""The table of where each quantizer call's input and codes are in the exported graph.

Written by the exporter right after tracing, when it still knows every lowered quantizer's kind
and form and torch has just named the nodes after their modules, and stored in the ONNX file's
metadata (key `QUANTIZER_CALLS`). Tier 1 of the parity check reads this table and never parses
node names itself, so renaming nodes (an optimizer, a future exporter) cannot silently empty it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import onnx
from torch import nn

from ..quant.kinds import LOG_SQRT2, SHIFTED
from .forms import ONNXRUNTIME
from .lowering import BISECT, lowered_quantizers

QUANTIZER_CALLS = "repq_export.quantizer_calls"


@dataclass(frozen=True)
class QuantizerCall:
    """One call of one quantizer: its module name, the call's scope, kind, form and value names."""

    name: str  # dotted module name in the fake-quant model
    call: str  # the ONNX scope (differs from `name` for repeated calls, e.g. the shared RPN convs)
    kind: str  # 'uniform' | 'shifted' | 'log_sqrt2'
    form: str  # 'tensorrt' | 'onnxruntime'
    x: str  # value name of the float input
    codes: str  # integer codes (tensorrt: q - zp in int8, onnxruntime: q in uint8), or the
    # dequantized output (log_sqrt2)


def scope_to_name(scope: str) -> str:
    """The module of an ONNX scope ('/rpn_head/rpn_conv/input_quantizer_2' ->
    'rpn_head.rpn_conv.input_quantizer'): torch numbers the repeated calls of a shared module."""
    return re.sub(r"_\d+$", "", scope.strip("/")).replace("/", ".")


def locate_calls(proto: onnx.ModelProto, lowered: nn.Module) -> list[QuantizerCall]:
    """Every call of every lowered quantizer of `lowered` in the traced graph `proto`, in graph order."""
    modules = dict(lowered_quantizers(lowered))
    producer = {o: n for n in proto.graph.node for o in n.output}
    by_scope: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        by_scope.setdefault(node.name.rsplit("/", 1)[0], []).append(node)
    calls = []
    for scope, nodes in by_scope.items():
        name = scope_to_name(scope)
        module = modules.get(name)
        if module is None:
            continue
        x, codes = _values(module, nodes, producer)
        calls.append(QuantizerCall(name, scope, module.kind, module.form, x, codes))
    missing = set(modules) - {c.name for c in calls}
    if missing:
        raise RuntimeError(f"exported graph: no nodes found for quantizer(s) {sorted(missing)[:3]}")
    return calls


def _values(module: nn.Module, nodes: list[onnx.NodeProto], producer: dict) -> tuple[str, str]:
    """(float input, codes) value names of one call, from the nodes its lowering emitted."""
    kind, form = module.kind, module.form
    if kind == LOG_SQRT2:
        x = next(n for n in nodes if n.op_type == "Less").input[0]  # the first comparison is on x, in either lowering
        if module.lowering == BISECT:  # the last Where: 0 for code 2^n, else lut[c] (`qdq.log_sqrt2_bisected`)
            return x, next(n for n in reversed(nodes) if n.op_type == "Where").output[0]
        table = next(n for n in nodes if n.op_type == "GatherElements" and n.input[0].endswith(".lut"))
        shaped = next(n for n in nodes if n.op_type == "Reshape" and n.input[0] == table.output[0])
        return x, shaped.output[0]  # lut[code] in the shape of x (`qdq.TableLookup`)
    q = next(n for n in nodes if n.op_type == "QuantizeLinear")
    if form == ONNXRUNTIME:
        clip = next((n for n in nodes if n.op_type == "Clip" and n.input[0] == q.output[0]), None)
        return q.input[0], (clip.output[0] if clip is not None else q.output[0])
    x = producer[q.input[0]].input[0]  # Clip(x) -> QuantizeLinear
    if kind == SHIFTED:
        x = producer[x].input[0]  # Add(x, shift) -> Clip
    return x, q.output[0]


def store_calls(proto: onnx.ModelProto, calls: list[QuantizerCall]) -> None:
    """Write the table into the model's metadata (replacing an older one)."""
    keep = [p for p in proto.metadata_props if p.key != QUANTIZER_CALLS]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    entry = proto.metadata_props.add()
    entry.key, entry.value = QUANTIZER_CALLS, json.dumps([asdict(c) for c in calls], separators=(",", ":"))


def read_calls(proto: onnx.ModelProto) -> list[QuantizerCall] | None:
    """The table stored in a model, or None for a graph without one (float, or not ours)."""
    for prop in proto.metadata_props:
        if prop.key == QUANTIZER_CALLS:
            return [QuantizerCall(**row) for row in json.loads(prop.value)]
    return None
