"""`Where(IsNaN(y), 0, y)` after every RoiAlign: OpenVINO's RoiAlign agrees with onnxruntime's.

A proposal clipped at the image border can have zero width or height. onnxruntime and
torchvision pool such a RoI to 0; OpenVINO's RoiAlign (half_pixel, adaptive sampling ratio)
divides 0 by 0 and returns NaN, which then poisons the box head's scores and NMS. The guard maps
exactly those NaNs to 0 and leaves every other value bit for bit as it was, so on onnxruntime the
guarded graph computes what the unguarded one does.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

UNGUARDED_SUFFIX = "__unguarded"  # the RoiAlign's own output, renamed; the guard's Where takes the old name
GUARD_NODE_SUFFIXES = ("/nan_guard_isnan", "/nan_guard_where")  # the names of the two nodes a guard adds


def guard_roi_align_nans(proto: onnx.ModelProto) -> int:
    """Add the guard after every RoiAlign of `proto` (in place); return how many were guarded.

    The RoiAlign's output is renamed and the guard's `Where` takes its old name, so consumers,
    graph outputs and the quantizer-call table keep pointing at the value they named. A RoiAlign
    already guarded is left alone (the rewrite can run twice)."""
    graph = proto.graph
    zero = "repq_roi_nan_guard_zero"
    nodes: list[onnx.NodeProto] = []
    guarded = 0
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "RoiAlign" or node.output[0].endswith(UNGUARDED_SUFFIX):
            continue
        value = node.output[0]
        raw = f"{value}{UNGUARDED_SUFFIX}"
        node.output[0] = raw
        base = node.name or value
        nodes.append(helper.make_node("IsNaN", [raw], [f"{raw}__isnan"], name=f"{base}{GUARD_NODE_SUFFIXES[0]}"))
        nodes.append(helper.make_node("Where", [f"{raw}__isnan", zero, raw], [value],
                                      name=f"{base}{GUARD_NODE_SUFFIXES[1]}"))
        guarded += 1
    if guarded and zero not in {i.name for i in graph.initializer}:
        graph.initializer.append(helper.make_tensor(zero, TensorProto.FLOAT, [], [0.0]))
    del graph.node[:]
    graph.node.extend(nodes)
    return guarded


def count_guarded(proto: onnx.ModelProto) -> tuple[int, int]:
    """(RoiAlign nodes, those whose output goes through the guard): a check that the guard is there."""
    roi = [n for n in proto.graph.node if n.op_type == "RoiAlign"]
    wheres = {n.input[2] for n in proto.graph.node if n.op_type == "Where" and len(n.input) == 3}
    return len(roi), sum(1 for n in roi if n.output[0] in wheres and n.output[0].endswith(UNGUARDED_SUFFIX))


def without_roi_nan_guard(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` with the guard taken out: each RoiAlign writes its value again, as an OpenVINO
    graph exported without the guard would (NaN for a RoI of zero width or height); the parity tests'
    breakage, kept beside the guard so that both read one set of names."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = [n for n in out.graph.node if not n.name.endswith(GUARD_NODE_SUFFIXES)]
    for node in kept:
        if node.op_type == "RoiAlign" and node.output[0].endswith(UNGUARDED_SUFFIX):
            node.output[0] = node.output[0][: -len(UNGUARDED_SUFFIX)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out
