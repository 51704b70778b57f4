"""Each quantizer kind's ONNX form gives fake quant's integer codes, run in onnxruntime."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from repq_export.export.qdq import (DQWeight, QDQActivation, log_sqrt2_bisected, log_sqrt2_lowered,
                                  log_sqrt2_odd_half)
from repq_export.quant.log_sqrt2 import log_sqrt2_codes, log_sqrt2_fake_quant, log_sqrt2_lut, log_sqrt2_thresholds
from repq_export.quant.uniform import fake_quant


def run_onnx(module: nn.Module, *inputs: torch.Tensor) -> tuple[list[np.ndarray], onnx.ModelProto]:
    """Export `module` with the legacy exporter (opset 17) and run it in onnxruntime (all optimizations)."""
    buffer = io.BytesIO()
    names = [f"x{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, buffer, dynamo=False, opset_version=17, input_names=names,
                          dynamic_axes={n: {0: "n"} for n in names})
    model = onnx.load_from_string(buffer.getvalue())
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)}), model


class ActQDQ(nn.Module):
    def __init__(self, scale: float, zero_point: int, n_bits: int) -> None:
        super().__init__()
        self.scale = torch.tensor(scale, dtype=torch.float32)
        lo, hi = -zero_point, 2**n_bits - 1 - zero_point
        self.lo, self.hi = self.scale * lo, self.scale * hi

    def forward(self, x):
        return QDQActivation.apply(x, self.scale, self.lo, self.hi)


@pytest.mark.parametrize("n_bits,zero_point", [(4, 7), (4, 0), (6, 40), (6, -3), (7, 100), (2, 1)])
def test_activation_qdq_codes_equal_fake_quant(n_bits: int, zero_point: int) -> None:
    torch.manual_seed(n_bits)
    scale = 0.0371
    x = torch.randn(50_000) * scale * 2**n_bits / 3
    ties = (torch.randint(-70, 70, (5_000,)).float() + 0.5) * scale  # exact and near ties
    x = torch.cat([x, ties, torch.tensor([0.0, -0.0, 1e9, -1e9])])
    (out,), model = run_onnx(ActQDQ(scale, zero_point, n_bits), x)
    want = fake_quant(x, torch.tensor(scale), torch.tensor(float(zero_point)), n_bits)
    assert np.array_equal(out, want.numpy())
    assert [n.op_type for n in model.graph.node if "Linear" in n.op_type] == ["QuantizeLinear", "DequantizeLinear"]


class WeightDQ(nn.Module):
    """A quantized input (as every quantized layer has) times a DequantizeLinear'd int8 weight.

    A float input times a DQ weight alone is not what we export: onnxruntime's default level
    turns that into a dynamically quantized (inexact) MatMul.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.act = ActQDQ(0.05, 8, 4)

    def forward(self, x):
        return self.act(x) @ DQWeight.apply(self.codes, self.scale, 1)


@pytest.mark.parametrize("n_bits", [4, 6])
def test_weight_dq_equals_fake_quant_and_is_int8(n_bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 24)  # (in, out): per output channel along axis 1
    scale = w.abs().amax(0) / (2 ** (n_bits - 1) - 1)
    zp = torch.full((24,), float(2 ** (n_bits - 1)))
    want_w = fake_quant(w, scale, zp, n_bits)
    codes = (torch.clamp(torch.round(w / scale) + zp, 0, 2**n_bits - 1) - zp).to(torch.int8)
    x = torch.randn(5, 16)
    (out,), model = run_onnx(WeightDQ(codes, scale), x)
    ints = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(ints) == 1 and list(ints[0].dims) == [16, 24]
    want_x = fake_quant(x, torch.tensor(0.05), torch.tensor(8.0), 4)
    np.testing.assert_allclose(out, (want_x @ want_w).numpy(), rtol=1e-5, atol=1e-5)


class LogQ(nn.Module):
    def __init__(self, scale: torch.Tensor, n_bits: int, cast_floors: bool = False) -> None:
        super().__init__()
        self.scale, self.n_bits, self.cast_floors = scale, n_bits, cast_floors
        self.upper = log_sqrt2_thresholds(scale, n_bits)
        self.lut = log_sqrt2_lut(scale, n_bits)

    def forward(self, x):
        return log_sqrt2_lowered(x, self.scale, self.upper, self.lut, self.n_bits, self.cast_floors)


@pytest.mark.parametrize("cast_floors", [False, True], ids=["floor", "cast"])
@pytest.mark.parametrize("n_bits", [3, 4, 6, 8])
def test_log_sqrt2_lowering_equals_fake_quant(n_bits: int, cast_floors: bool) -> None:
    """Exact at every width; at 8 bits the last boundaries are subnormal floats (the softmax of a
    masked window gives such values), where a guess from Log(clamp(x, tiny)) is many codes off."""
    torch.manual_seed(1)
    attn = torch.softmax(torch.randn(64, 49, 49) * 3, dim=-1).flatten()
    scale = torch.tensor(0.83)
    t = log_sqrt2_thresholds(scale, n_bits)
    boundary = torch.cat([t, torch.nextafter(t, torch.zeros_like(t)), torch.nextafter(t, torch.ones_like(t))])
    x = torch.cat([attn, boundary, torch.tensor([0.0, 1.0, 1e-30, 1e-40, 1e-45])])
    want = log_sqrt2_fake_quant(x, scale, n_bits)
    assert torch.equal(LogQ(scale, n_bits, cast_floors)(x), want)  # the torch form of the lowering
    (out,), model = run_onnx(LogQ(scale, n_bits, cast_floors), x)
    assert np.array_equal(out, want.numpy())
    codes = log_sqrt2_codes(x, scale, n_bits)
    assert int((codes == 2**n_bits).sum()) > 0 and int((codes == 0).sum()) > 0  # both ends exercised
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert any(n.op_type == "Floor" for n in model.graph.node) != cast_floors


class LogQBisected(LogQ):
    def forward(self, x):
        return log_sqrt2_bisected(x, self.scale, self.upper, log_sqrt2_odd_half(), self.n_bits)


def log_sqrt2_probe(scale: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Softmax values, every boundary and its float32 neighbours, 0, 1, subnormals: what a lowering must get right."""
    torch.manual_seed(1)
    attn = torch.softmax(torch.randn(64, 49, 49) * 3, dim=-1).flatten()
    t = log_sqrt2_thresholds(scale, n_bits)
    boundary = torch.cat([t, torch.nextafter(t, torch.zeros_like(t)), torch.nextafter(t, torch.ones_like(t))])
    return torch.cat([attn, boundary, torch.tensor([0.0, 1.0, 2.0, 1e-30, 1e-40, 1e-45, -1.0])])


@pytest.mark.parametrize("scale", [0.83, 0.0371, 1.0])
@pytest.mark.parametrize("n_bits", [2, 3, 4, 6, 8])
def test_log_sqrt2_bisected_equals_fake_quant(n_bits: int, scale: float) -> None:
    """The OpenVINO lowering: comparisons and power-of-two rescalings give fake quant's output bit for bit,
    in torch and in onnxruntime, with no Log, table lookup or integer op in the graph."""
    scale = torch.tensor(scale)
    x = log_sqrt2_probe(scale, n_bits)
    want = log_sqrt2_fake_quant(x, scale, n_bits)
    assert torch.equal(LogQBisected(scale, n_bits)(x), want)
    (out,), model = run_onnx(LogQBisected(scale, n_bits), x)
    assert np.array_equal(out, want.numpy())
    assert {n.op_type for n in model.graph.node} <= {"Less", "Where", "Mul", "Constant"}


def test_log_sqrt2_bisected_fails_with_one_boundary_moved() -> None:
    """The check above can fail: a table whose boundary t_3 is one float32 step lower changes the codes."""
    scale, n_bits = torch.tensor(0.83), 4
    x = log_sqrt2_probe(scale, n_bits)
    broken = LogQBisected(scale, n_bits)
    broken.upper = broken.upper.clone()
    broken.upper[3] = torch.nextafter(broken.upper[3], torch.tensor(0.0))
    assert not torch.equal(broken(x), log_sqrt2_fake_quant(x, scale, n_bits))
