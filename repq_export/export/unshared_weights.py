"""One copy of a weight's integer codes per DequantizeLinear: OpenVINO keeps every quantized conv on int8.

A module called more than once (the RPN head's convs, once per FPN level) is traced as one
DequantizeLinear per call over one shared codes initializer. OpenVINO, compiling such a graph for a
static input shape, folds those shared DequantizeLinears into float weights and runs the convs in f32
(the full-size Mask R-CNN: 15 of its 29 quantized convs). Giving each call its own copy of the codes
(the RPN's three convs: a few MiB of int8) keeps them int8; the values are the same bit for bit.
"""

from __future__ import annotations

import onnx

COPY_SUFFIX = "__call"


def unshare_weight_codes(proto: onnx.ModelProto) -> int:
    """Give every DequantizeLinear of a weight (an initializer of rank > 1) its own codes initializer,
    in place; return how many copies were added (0 where no codes are shared, e.g. run twice)."""
    graph = proto.graph
    weights = {i.name: i for i in graph.initializer if len(i.dims) > 1}
    seen: set[str] = set()
    copies = []
    for node in graph.node:
        name = node.input[0] if node.op_type == "DequantizeLinear" else None
        if name not in weights:
            continue
        if name not in seen:
            seen.add(name)
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(weights[name])
        copy.name = f"{name}{COPY_SUFFIX}{len(copies) + 1}"
        node.input[0] = copy.name
        copies.append(copy)
    graph.initializer.extend(copies)
    return len(copies)


def shared_weight_codes(proto: onnx.ModelProto) -> int:
    """How many weight DequantizeLinears read codes that another one reads too (0 after the rewrite)."""
    weights = {i.name for i in proto.graph.initializer if len(i.dims) > 1}
    reads = [n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    return len(reads) - len(set(reads))
