"""Deliberately broken copies of an exported graph: backends whose integer codes tier 1 cannot fault
(their quantizers are intact) but whose float parts or RoI geometry differ. The parity tests and
`tools/parity_sensitivity.py` use them to show what tiers 2 and 3 catch, and from how many images."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

ROI_MODES = ("half_pixel", "output_half_pixel")


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def with_roi_align_mode(proto: onnx.ModelProto, mode: str) -> onnx.ModelProto:
    """Every RoiAlign with ``coordinate_transformation_mode`` = ``mode`` (the export uses 'half_pixel')."""
    out = _copy(proto)
    for node in out.graph.node:
        if node.op_type == "RoiAlign":
            _set_attribute(node, "coordinate_transformation_mode", mode)
    return out


def with_layernorm_epsilon(proto: onnx.ModelProto, epsilon: float) -> onnx.ModelProto:
    """Every LayerNormalization with another ``epsilon`` (the model's is 1e-5)."""
    out = _copy(proto)
    for node in out.graph.node:
        if node.op_type == "LayerNormalization":
            _set_attribute(node, "epsilon", float(epsilon))
    return out


def with_float16_outputs(proto: onnx.ModelProto, op_types: tuple[str, ...] = ("LayerNormalization", "Softmax"),
                         every: int = 1) -> onnx.ModelProto:
    """The output of every ``every``-th node of ``op_types`` rounded to float16 and back (a Cast pair), as a
    backend running those float parts in half precision would."""
    out = _copy(proto)
    nodes, seen = [], 0
    for node in out.graph.node:
        nodes.append(node)
        if node.op_type not in op_types:
            continue
        seen += 1
        if (seen - 1) % every:
            continue
        # the producer writes a new name and the Cast pair writes the old one, so every reader of the
        # tensor (consumers, and tier 1's probe, which taps tensors by name) sees the half-rounded value
        value = node.output[0]
        exact = f"{value}__fp32_exact"
        node.output[0] = exact
        half = helper.make_node("Cast", [exact], [f"{value}__fp16"], to=TensorProto.FLOAT16,
                                name=f"{node.name}/fp16_cast")
        back = helper.make_node("Cast", [f"{value}__fp16"], [value], to=TensorProto.FLOAT,
                                name=f"{node.name}/fp32_cast")
        nodes += [half, back]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def with_quantizer_scale(proto: onnx.ModelProto, index: int = 0, factor: float = 1.5) -> onnx.ModelProto:
    """The ``index``-th QuantizeLinear's scale multiplied by ``factor`` (its DequantizeLinear left alone): codes
    off by a step, which tier 1 must fault."""
    out = _copy(proto)
    node = [n for n in out.graph.node if n.op_type == "QuantizeLinear"][index]
    scale = f"{node.input[1]}__scaled"
    factor_name = f"{scale}__factor"
    out.graph.initializer.append(helper.make_tensor(factor_name, TensorProto.FLOAT, [], [factor]))
    mul = helper.make_node("Mul", [node.input[1], factor_name], [scale], name=f"{node.name}/scale_off")
    position = list(out.graph.node).index(node)
    node.input[1] = scale
    out.graph.node.insert(position, mul)
    return out
