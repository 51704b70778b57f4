"""Rule `integer_conv`: a float-output quantized conv as im2col (one Gather of the taps' pixels) and
an integer MatMul; the same conv on every image of a batch, on 0 images, and exactly where every
product is a float32 value. A conv it must leave says why."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from repq_export.export.graph_index import index_graph
from repq_export.export.ort_check import check_onnxruntime_form
from repq_export.export.rules.integer_conv import INTEGER_CONV
from repq_export.export.rules.integer_matmul import INTEGER_MATMUL
from repq_export.export.rules.rule import apply_rule, apply_rules

from rule_graphs import conv_graph, run

SHAPES = ((3, 1), (3, 0), (1, 0))  # (kernel, pad)


def test_integer_conv_computes_the_same_conv_on_every_image_of_a_batch() -> None:
    """im2col + MatMulIntegerToFloat equals the float conv (to float rounding) for 3 images of an
    odd size, with and without padding: the mask head's convs run on a batch of RoIs."""
    x = np.random.default_rng(1).normal(size=(3, 8, 9, 11)).astype(np.float32)
    for kernel, pad in SHAPES:
        before, after = conv_graph(kernel, pad), conv_graph(kernel, pad)
        assert apply_rules(after, [INTEGER_CONV, INTEGER_MATMUL]) == {"integer_conv": 1, "integer_matmul": 1}
        ops = [n.op_type for n in after.graph.node]
        assert "Conv" not in ops and ops.count("MatMulIntegerToFloat") == 1
        assert ("Gather" in ops) == (kernel > 1) and check_onnxruntime_form(after) == []
        y0, y1 = run(before, after, x=x)
        assert y0.shape == y1.shape == (3, 6, 9 - kernel + 1 + 2 * pad, 11 - kernel + 1 + 2 * pad)
        assert np.abs(y0 - y1).max() <= 1e-6 * np.abs(y0).max()


def test_integer_conv_alone_gives_the_float_conv_bit_for_bit() -> None:
    """Power-of-two scales make every sum a float32 value: the im2col's `DQ -> MatMul` (before
    `integer_matmul`) and then the integer kernel give exactly the float conv's output."""
    x = np.random.default_rng(3).normal(size=(2, 8, 7, 10)).astype(np.float32)
    for kernel, pad in SHAPES:
        before, im2col, integer = (conv_graph(kernel, pad, exact=True) for _ in range(3))
        assert apply_rule(im2col, INTEGER_CONV) == 1
        assert apply_rules(integer, [INTEGER_CONV, INTEGER_MATMUL]) == {"integer_conv": 1, "integer_matmul": 1}
        y0, y1, y2 = run(before, im2col, integer, x=x)
        assert np.abs(y0).max() > 0 and np.array_equal(y0, y1) and np.array_equal(y0, y2)


def _strided():
    return conv_graph(3, 1, stride=2)


def _grouped():
    model = conv_graph(3, 1)
    model.graph.node[-1].attribute.append(helper.make_attribute("group", 2))
    return model


def _per_input_channel():
    model = conv_graph(3, 1)
    model.graph.node[3].attribute[0].CopyFrom(helper.make_attribute("axis", 1))
    return model


@pytest.mark.parametrize("build, reason", [(_strided, "stride other than 1"), (_grouped, "a grouped conv"),
                                           (_per_input_channel, "not quantized per output channel")])
def test_integer_conv_leaves_a_conv_it_cannot_write_and_says_why(build, reason) -> None:
    """A strided, grouped, or per-input-channel conv matches the pattern; the check refuses it with
    its reason and the graph is left as it was."""
    model = build()
    graph = index_graph(model)
    (match,) = INTEGER_CONV.pattern(graph)
    assert reason in INTEGER_CONV.check(graph, match)
    before = model.SerializeToString()
    assert apply_rule(model, INTEGER_CONV) == 0 and model.SerializeToString() == before


def test_integer_conv_leaves_a_conv_onnxruntime_fuses() -> None:
    """A conv one QuantizeLinear reads (int8 weights) becomes a QLinearConv in onnxruntime itself."""
    model = conv_graph(3, 1)
    model.graph.node.append(helper.make_node("QuantizeLinear", ["y", "xs", "xzp"], ["yq"]))
    model.graph.output[0].name = "yq"
    graph = index_graph(model)
    assert "QLinearConv already" in INTEGER_CONV.check(graph, INTEGER_CONV.pattern(graph)[0])


def _shape_of(model, name: str) -> list[int] | None:
    """The constant shape a Reshape node named `name` reshapes to."""
    node = next(n for n in model.graph.node if n.name == name)
    value = index_graph(model).constant(node.input[1])
    return None if value is None else value.tolist()


def test_integer_conv_runs_on_a_batch_of_zero_images() -> None:
    """0 RoIs (an image without detections) give the mask head's convs a batch of 0: the rewritten
    conv gives the float conv's empty output, shape (0, K, H', W'), with and without padding, at
    onnxruntime's default level too. The im2col row width is written out (kh*kw*C)."""
    x = np.zeros((0, 8, 14, 14), np.float32)
    for kernel, pad in SHAPES:
        before, after = conv_graph(kernel, pad), conv_graph(kernel, pad)
        assert apply_rules(after, [INTEGER_CONV, INTEGER_MATMUL]) == {"integer_conv": 1, "integer_matmul": 1}
        if kernel > 1:
            assert _shape_of(after, "conv/im2col") == [0, 0, 0, kernel * kernel * 8]
        y0, y1 = run(before, after, x=x)
        assert y0.shape == y1.shape == (0, 6, 14 - kernel + 1 + 2 * pad, 14 - kernel + 1 + 2 * pad)
        session = ort.InferenceSession(after.SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.run(None, {"x": x})[0].shape == y0.shape


def test_the_old_im2col_shape_fails_on_zero_images_and_check_says_so() -> None:
    """The im2col's last Reshape as it was, (0, 0, 0, -1): onnxruntime cannot infer -1 from 0
    elements, and `check`'s empty-reshape rule names the node."""
    model = conv_graph(3, 1)
    apply_rule(model, INTEGER_CONV)
    node = next(n for n in model.graph.node if n.name == "conv/im2col")
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, -1], np.int64), "old_shape"))
    node.input[1] = "old_shape"
    assert [(i.rule, i.node) for i in check_onnxruntime_form(model)] == [("empty-reshape", "conv/im2col")]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((2, 8, 5, 5), np.float32)})[0].shape == (2, 6, 5, 5)
    with pytest.raises(Exception, match="cannot be reshaped"):
        session.run(None, {"x": np.zeros((0, 8, 5, 5), np.float32)})
