"""The ONNX forms of the quantizers: one traceable torch function per quantizer kind.

Each function computes in torch exactly what its ONNX nodes compute, so the exported graph and
the fake-quant model give the same integer codes (docs/numerics.md). They are written as
autograd Functions with a `symbolic` because torch.onnx has no lowering for sub-8-bit fake
quantization (it accepts only the 8-bit ranges).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant.log_sqrt2 import log_sqrt2_lut


class QDQActivation(torch.autograd.Function):
    """Uniform per-tensor activation: Clip(lo*d, hi*d) -> QuantizeLinear(d, 0) -> DequantizeLinear.

    With codes lo = -zp, hi = 2^n - 1 - zp this equals `(clamp(round(x/d) + zp, 0, 2^n-1) - zp) * d`
    bit for bit: both round half to even, onnxruntime divides by the scale like torch does, and
    the clip bounds divide back to the integers lo, hi.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, clip_lo: Tensor, clip_hi: Tensor) -> Tensor:  # noqa: D102
        q = torch.round(torch.clamp(x, clip_lo, clip_hi) / scale)
        return q * scale

    @staticmethod
    def symbolic(g, x, scale, clip_lo, clip_hi):  # noqa: D102
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        clipped = g.op("Clip", x, clip_lo, clip_hi)
        q = g.op("QuantizeLinear", clipped, scale, zero)
        return g.op("DequantizeLinear", q, scale, zero)


class QDQActivationU8(torch.autograd.Function):
    """Uniform per-tensor activation for onnxruntime: QuantizeLinear(d, zp, uint8) -> Clip(uint8)
    -> DequantizeLinear(d, zp).

    QuantizeLinear gives saturate(round(x/d) + zp) in [0, 255]; clipping that integer to
    [0, 2^n - 1] (no Clip at n = 8) is the fake quantizer's clamp, so the codes are fake quant's
    own, bit for bit. The range is enforced in the integer domain, after QuantizeLinear, so that
    onnxruntime still sees `DQ -> op -> Q` around each quantized op and runs it on its integer
    kernels (QLinearConv, QGemm, QLinearMatMul).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zp: Tensor, lo: Tensor, hi: Tensor,  # noqa: D102
                zero_point: int, n_bits: int) -> Tensor:
        # zp, lo = 0, hi = 2^n - 1 as float tensors (Python numbers here break the tracer's peephole
        # pass); zero_point and n_bits are the same numbers as ints, for the symbolic.
        return (torch.clamp(torch.round(x / scale) + zp, lo, hi) - zp) * scale

    @staticmethod
    def symbolic(g, x, scale, zp, lo, hi, zero_point, n_bits):  # noqa: D102
        zero = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
        q = g.op("QuantizeLinear", x, scale, zero)
        if n_bits < 8:
            low = g.op("Constant", value_t=torch.tensor(0, dtype=torch.uint8))
            high = g.op("Constant", value_t=torch.tensor(2**n_bits - 1, dtype=torch.uint8))
            q = g.op("Clip", q, low, high)
        return g.op("DequantizeLinear", q, scale, zero)


class DQWeight(torch.autograd.Function):
    """A constant weight and its per-channel scale: DequantizeLinear(codes, scale, zp, axis).

    int8 codes q - zp with zero point 0 (`zero_point` None), or uint8 codes q with the
    quantizer's own per-channel zero points (8-bit weights in the onnxruntime form).
    """

    @staticmethod
    def forward(ctx, codes: Tensor, scale: Tensor, axis: int, zero_point: Tensor | None = None) -> Tensor:  # noqa: D102
        shape = [1] * codes.dim()
        shape[axis] = -1
        signed = codes.float() if zero_point is None else codes.float() - zero_point.float().reshape(shape)
        return signed * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, axis, zero_point=None):  # noqa: D102
        if zero_point is None:
            channels = scale.type().sizes()[0]
            zero_point = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int8))
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


class DQBias(torch.autograd.Function):
    """An int32 bias in units of input_scale x weight_scale: DequantizeLinear(k, step, 0, axis 0).

    onnxruntime folds it into QLinearConv / QGemm as the accumulator's int32 bias.
    """

    @staticmethod
    def forward(ctx, k: Tensor, step: Tensor) -> Tensor:  # noqa: D102
        return k.float() * step

    @staticmethod
    def symbolic(g, k, step):  # noqa: D102
        channels = step.type().sizes()[0]
        zero = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int32))
        return g.op("DequantizeLinear", k, step, zero, axis_i=0)


class TableLookup(torch.autograd.Function):
    """table[index] for a small 1-D table and int32 indices of any shape, as
    Reshape(-1) -> GatherElements -> Reshape: onnxruntime's CPU GatherElements over a flat index
    is about 6x faster than its Gather (which copies element by element) on an attention map."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:  # noqa: D102
        return table[index]

    @staticmethod
    def symbolic(g, table, index):  # noqa: D102
        flat = g.op("Reshape", index, g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64)))
        values = g.op("GatherElements", table, flat, axis_i=0)
        return g.op("Reshape", values, g.op("Shape", index))


def log_sqrt2_lowered(x: Tensor, scale: Tensor, upper: Tensor, lut: Tensor, n_bits: int,
                      cast_floors: bool = False) -> Tensor:
    """Log-sqrt2 quantization as plain float ops (Log, one comparison, two table lookups).

    The code of x is c = #{k : x < t_k}, with t_k ~ d * 2^-(k + 1/2)/2 the float32 bucket boundaries
    the fake quantizer compares against (`quant.log_sqrt2.log_sqrt2_thresholds`). In real numbers
    c = ceil(v) with v = -2 log2(x / d) - 1/2, and x < t_g is exactly v > g. So for any integer g
    within one of v, c = g + [x < t_g]: g = floor(-2 log2(x / d)) from float32 Log is such a guess
    (its error, from Log and from multiplying by 1/d, is far below 1/2), clamped to 0 .. 2^n - 1,
    where the same identity still holds at both ends. One lookup of the boundary and one
    comparison make the code exact; the output is lut[c], the fake quantizer's own table
    (lut[2^n] = 0; x = 0 lands there).

    cast_floors: clamp first and let the int32 Cast truncate (onnxruntime's Cast truncates toward
    zero, which is floor on 0 .. 2^n - 1), one pass fewer than Floor; the TensorRT form keeps Floor.
    Below 8 bits the onnxruntime form also takes Log of x itself, not of max(x, tiny): Log(0) =
    -inf gives the guess +inf, clamped to 2^n - 1 like any x under d * 2^-(2^n/2) (one pass fewer
    again); the TensorRT form keeps the clamp, as TensorRT does not document Log(0).
    """
    levels = 2**n_bits
    tiny = torch.finfo(torch.float32).tiny
    if n_bits >= 8:
        # the last boundaries sqrt2^-k * scale (k near 256) are subnormal, where a clamp at `tiny`
        # (and vectorized Log) would put the guess many codes off: guess on x * 2^64 (exact, a
        # power of two) and shift the guess back by log_sqrt2(2^64) = 128 codes
        x_guess, shift = x * 18446744073709551616.0, 128.0
    else:
        x_guess, shift = x, 0.0
    # a product by 1/d rather than a quotient: cheaper, and the guess need not be exact
    positive = x_guess if cast_floors and not shift else torch.clamp(x_guess, min=tiny)
    guess = torch.log(positive * torch.reciprocal(scale)) * (-2.0 / 0.6931471805599453)
    if shift:
        guess = guess + shift
    # int32 indices (codes are 0 .. 256): half the memory traffic of int64 over every attention map
    guess = torch.clamp(guess if cast_floors else torch.floor(guess), 0, levels - 1).int()
    return TableLookup.apply(lut, guess + (x < TableLookup.apply(upper, guess)).int())


def log_sqrt2_odd_half() -> Tensor:
    """2^-1 * (1 + (sqrt2 - 1)) in the float32 arithmetic of the fake quantizer's table (its entry 1 at scale 1)."""
    return log_sqrt2_lut(torch.ones(()), 1)[1]


def log_sqrt2_bisected(x: Tensor, scale: Tensor, upper: Tensor, odd_half: Tensor, n_bits: int) -> Tensor:
    """Log-sqrt2 quantization by comparisons and power-of-two rescalings only (no Log, no lookup).

    A binary search on the code c = #{k : x < t_k}: at a step of size b (2^(n-1), ..., 2) the code is
    at least s + b exactly when x < t_(s+b-1), and with x' = x * 2^(s/2) that is x' < t_(b-1): t_k is
    the smallest float32 not below the irrational boundary d * 2^-(k + 1/2)/2, so for a float32 x,
    x < t_k is x below the boundary itself, and scaling both sides by a power of two keeps the order
    (x' is exact, as s is even). A hit adds b to s and multiplies x' by 2^(b/2); the last step, b = 1,
    is x' < t_0 (an odd code). The output is the table's lut[c] = (2^-ceil(c/2) * odd) * d, in its
    own float32 order: 2^-(s/2) (a product of exact powers of two) times 1 or `odd_half` (= 2^-1 * odd),
    then times d; and 0 where x < t_(2^n - 1) (code 2^n). Every op is elementwise (Less, Where, Mul),
    which OpenVINO, compiling for static shapes, fuses into one JIT kernel; its Log and GatherElements
    (the table lowering) run reference kernels.
    """
    zero = x < upper[-1]
    scaled, gain = x, None
    step = 2 ** (n_bits - 1)
    while step >= 2:
        hit = scaled < upper[step - 1]
        up, down = torch.tensor(2.0 ** (step // 2)), torch.tensor(2.0 ** -(step // 2))
        scaled = torch.where(hit, scaled * up, scaled)
        gain = torch.where(hit, down, torch.tensor(1.0)) if gain is None else torch.where(hit, gain * down, gain)
        step //= 2
    mantissa = torch.where(scaled < upper[0], odd_half, torch.tensor(1.0))
    return torch.where(zero, torch.tensor(0.0), (mantissa if gain is None else gain * mantissa) * scale)
