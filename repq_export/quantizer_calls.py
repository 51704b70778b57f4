"""The quantizer-call table an exported graph carries: where each quantizer call's input and codes are.

The exporter writes it into the ONNX file's metadata (key `QUANTIZER_CALLS`) right after tracing
(export/locations.py finds the calls); tier 1 of the parity check reads it back and never parses
node names itself, so renaming nodes (an optimizer, a future exporter) cannot silently empty it.
The record and its reading and writing sit here, below both, as graph_targets.py does for the
target CPU entry.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import onnx

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
