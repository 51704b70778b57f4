"""Where each quantizer call's input and codes are in a freshly traced graph.

Run by the exporter right after tracing, when it still knows every lowered quantizer's kind
and form and torch has just named the nodes after their modules. The table it makes is stored
in the graph's metadata (`quantizer_calls.py`), where tier 1 of the parity check reads it.
"""

from __future__ import annotations

import onnx
from torch import nn

from ..quant.kinds import LOG_SQRT2, SHIFTED
from ..quantizer_calls import QuantizerCall, scope_to_name
from .forms import ONNXRUNTIME
from .lowering import BISECT, lowered_quantizers


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
