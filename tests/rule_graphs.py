"""Shared by the rewrite-rule tests: small quantized graphs of one linear or one conv, and a run
of several models on the same input through onnxruntime without its own graph optimizations."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _scales(rng: np.random.Generator, n: int, exact: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input scale, n weight scales, n bias steps): powers of two where `exact`, so that every
    product and sum of the graphs below is a float32 value and any two kernels agree bit for bit."""
    if exact:
        return (np.float32(2.0**-5), (2.0 ** -rng.integers(5, 9, n)).astype(np.float32),
                np.full(n, 2.0**-10, np.float32))
    return np.float32(0.05), rng.uniform(0.01, 0.02, n).astype(np.float32), rng.uniform(1e-4, 2e-4, n).astype(np.float32)


def linear_graph(bits: int = 4, exact: bool = False) -> onnx.ModelProto:
    """x -> Q(uint8) -> DQ -> MatMul(DQ(weight codes, per-column scale)) -> Add(DQ(int32 bias)):
    int8 codes with zero point 0 below 8 bits, uint8 codes with per-column zero points at 8."""
    rng = np.random.default_rng(0)
    xs, ws, step = _scales(np.random.default_rng(2), 8, exact)
    if bits == 8:
        weight = [numpy_helper.from_array(rng.integers(0, 256, (16, 8)).astype(np.uint8), "w"),
                  numpy_helper.from_array(rng.integers(0, 256, 8).astype(np.uint8), "wzp")]
    else:
        weight = [numpy_helper.from_array(rng.integers(-7, 8, (16, 8)).astype(np.int8), "w"),
                  numpy_helper.from_array(np.zeros(8, np.int8), "wzp")]
    k = rng.integers(-500, 500, 8).astype(np.int32)
    inits = weight + [numpy_helper.from_array(xs, "xs"), numpy_helper.from_array(np.uint8(7), "xzp"),
             numpy_helper.from_array(ws, "ws"), numpy_helper.from_array(k, "k"), numpy_helper.from_array(step, "step"),
             numpy_helper.from_array(np.zeros(8, np.int32), "kzp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "xs", "xzp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["mm"], name="fc"),
             helper.make_node("DequantizeLinear", ["k", "step", "kzp"], ["b"], axis=0),
             helper.make_node("Add", ["mm", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def conv_graph(kernel: int, pad: int, stride: int = 1, exact: bool = False) -> onnx.ModelProto:
    """x -> Q(uint8, 4-bit Clip) -> DQ -> Conv(DQ(int8 weight codes, per-channel scale)) -> float
    output: the float-output conv `integer_conv` rewrites, on any batch, height and width."""
    rng = np.random.default_rng(0)
    xs, ws, _ = _scales(np.random.default_rng(2), 6, exact)
    inits = [numpy_helper.from_array(rng.integers(-7, 8, (6, 8, kernel, kernel)).astype(np.int8), "w"),
             numpy_helper.from_array(np.zeros(6, np.int8), "wzp"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(xs, "xs"), numpy_helper.from_array(np.uint8(7), "xzp"),
             numpy_helper.from_array(np.uint8(0), "lo"), numpy_helper.from_array(np.uint8(15), "hi")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["q0"]),
             helper.make_node("Clip", ["q0", "lo", "hi"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "xs", "xzp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[pad] * 4, strides=[stride] * 2)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def zero_rows(model: onnx.ModelProto) -> onnx.ModelProto:
    """The linear graph with a dynamic leading dim, fed 0 rows (the box head's fcs on 0 RoIs)."""
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "rois"
    return model


def run(*models: onnx.ModelProto, x: np.ndarray | None = None) -> list[np.ndarray]:
    """Each model's output on the same `x` (default: a (2, 5, 16) normal sample), unoptimized."""
    import onnxruntime as ort

    x = {"x": np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32) if x is None else x}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return [ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, x)[0]
            for m in models]
