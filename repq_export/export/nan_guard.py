"""A guard before every RoiAlign: OpenVINO's RoiAlign then agrees with onnxruntime's.

A proposal clipped at the image border can have zero width or height. onnxruntime and
torchvision pool such a RoI to 0; OpenVINO's RoiAlign (half_pixel, adaptive sampling ratio)
takes ceil(size / bins) = 0 samples per bin, divides 0 by 0 and returns NaN, which then poisons
the box head's scores and NMS.

The guard works on the RoIs, not on the pooled output: it computes each RoI's width and height
in feature-map pixels as RoiAlign does (`x * spatial_scale - 0.5`, then end - start; exact for the
power-of-two scales of an FPN, so the graph and the kernel cannot disagree about a size of 0) and
moves every RoI whose width or height is not positive to `FAR`, a box far outside any image, which
every RoiAlign pools to exactly 0 (all its samples fall outside the map). All other RoIs pass
untouched, so on onnxruntime the guarded graph computes what the unguarded one does, bit for bit.
It edits (n, 4) boxes instead of the (n, C, 7, 7) and (n, C, 14, 14) outputs: the output form,
`Where(IsNaN(y), 0, y)`, cost about 4% of a full-size W4A4 inference on OpenVINO.

A RoiAlign with a scale that is not a power of two gets the output form, whose result does not
depend on how the kernel rounds `x * spatial_scale`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GUARD_TAG = "/roi_guard"  # every node the guard adds is named <RoiAlign's name>/roi_guard_<part>
UNGUARDED_SUFFIX = "__unguarded"  # output form only: the RoiAlign's own output, renamed
#: a box far outside any image (input pixels): at every FPN scale all its samples fall outside the map
FAR = (-8192.0, -8192.0, -8128.0, -8128.0)
HALF_PIXEL_OFFSET = -0.5  # RoiAlign's half_pixel mode: a corner x maps to x * spatial_scale - 0.5


def _power_of_two(scale: float) -> bool:
    return scale > 0 and math.frexp(scale)[0] == 0.5


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _roi_guard(node: onnx.NodeProto, scale: float) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and constants that replace `node`'s RoIs by FAR where width or height <= 0 (NaN too)."""
    base = f"{node.name or node.output[0]}{GUARD_TAG}"
    rois = node.input[1]

    def name(part: str) -> str:
        return f"{base}_{part}"

    consts = [
        numpy_helper.from_array(np.array(scale, np.float32), name("scale")),
        numpy_helper.from_array(np.array(HALF_PIXEL_OFFSET, np.float32), name("offset")),
        numpy_helper.from_array(np.array(FAR, np.float32).reshape(1, 4), name("far")),
        numpy_helper.from_array(np.array(0.0, np.float32), name("zero")),
    ]
    for part, values in {"i0": [0], "i1": [1], "i2": [2], "i4": [4]}.items():
        consts.append(numpy_helper.from_array(np.array(values, np.int64), name(part)))

    def make(op: str, inputs: list[str], part: str) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [name(part)], name=name(part))

    nodes = [
        make("Mul", [rois, name("scale")], "scaled"),
        make("Add", [name("scaled"), name("offset")], "corners"),           # as RoiAlign maps the corners
        make("Slice", [name("corners"), name("i0"), name("i2"), name("i1")], "start"),
        make("Slice", [name("corners"), name("i2"), name("i4"), name("i1")], "end"),
        make("Sub", [name("end"), name("start")], "size"),                  # (n, 2): width, height
        make("Greater", [name("size"), name("zero")], "positive"),           # NaN compares False
        make("Slice", [name("positive"), name("i0"), name("i1"), name("i1")], "w_ok"),
        make("Slice", [name("positive"), name("i1"), name("i2"), name("i1")], "h_ok"),
        make("And", [name("w_ok"), name("h_ok")], "ok"),                     # (n, 1)
        make("Where", [name("ok"), rois, name("far")], "where"),
    ]
    return nodes, consts


def _output_guard(node: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """`Where(IsNaN(y), 0, y)` after `node`: its output is renamed and the Where takes the old name."""
    base = f"{node.name or node.output[0]}{GUARD_TAG}"
    value = node.output[0]
    raw = f"{value}{UNGUARDED_SUFFIX}"
    node.output[0] = raw
    zero = numpy_helper.from_array(np.array(0.0, np.float32), f"{base}_zero")
    return [helper.make_node("IsNaN", [raw], [f"{raw}__isnan"], name=f"{base}_isnan"),
            helper.make_node("Where", [f"{raw}__isnan", zero.name, raw], [value], name=f"{base}_where")], [zero]


def _is_guarded(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> bool:
    rois = producers.get(node.input[1])
    return node.output[0].endswith(UNGUARDED_SUFFIX) or (rois is not None and GUARD_TAG in rois.name)


def guard_roi_align_nans(proto: onnx.ModelProto) -> int:
    """Guard every RoiAlign of `proto` (in place) and return how many were guarded. A RoiAlign already
    guarded is left alone (the rewrite can run twice); graph outputs and the quantizer-call table keep
    pointing at the values they named."""
    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    guarded = 0
    for node in graph.node:
        if node.op_type != "RoiAlign" or _is_guarded(node, producers):
            nodes.append(node)
            continue
        scale = float(_attr(node, "spatial_scale", 1.0))
        if _power_of_two(scale) and _attr(node, "coordinate_transformation_mode", b"half_pixel") == b"half_pixel":
            added, consts = _roi_guard(node, scale)
            node.input[1] = added[-1].output[0]
            nodes.extend(added + [node])
        else:
            added, consts = _output_guard(node)
            nodes.extend([node] + added)
        graph.initializer.extend(consts)
        guarded += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return guarded


def count_guarded(proto: onnx.ModelProto) -> tuple[int, int]:
    """(RoiAlign nodes, those guarded): a check that the guard is there."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    roi = [n for n in proto.graph.node if n.op_type == "RoiAlign"]
    return len(roi), sum(1 for n in roi if _is_guarded(n, producers))


def without_roi_nan_guard(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` with the guards taken out: each RoiAlign reads its own RoIs and writes its value
    again, as an OpenVINO graph exported without the guard would (NaN for a RoI of zero width or
    height); the parity tests' breakage, kept beside the guard so that both read one set of names."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    guard_nodes = [n for n in out.graph.node if GUARD_TAG in n.name]
    original_rois = {n.output[0]: n.input[1] for n in guard_nodes if n.op_type == "Where" and len(n.input) == 3
                     and n.name.endswith("_where") and not n.input[0].endswith("__isnan")}
    kept = [n for n in out.graph.node if GUARD_TAG not in n.name]
    for node in kept:
        if node.op_type != "RoiAlign":
            continue
        node.input[1] = original_rois.get(node.input[1], node.input[1])
        if node.output[0].endswith(UNGUARDED_SUFFIX):
            node.output[0] = node.output[0][: -len(UNGUARDED_SUFFIX)]
    used = {i for n in kept for i in n.input}
    inits = [i for i in out.graph.initializer if GUARD_TAG not in i.name or i.name in used]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out
