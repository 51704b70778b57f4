"""The onnxruntime form's graph rewrites: the rules (`export/rules/`) that let onnxruntime run every
quantized conv and linear on integer kernels, without changing what any quantizer sees.

onnxruntime fuses `DQ -> Conv (-> Relu) -> Q` into QLinearConv, but only where exactly one
QuantizeLinear reads the conv, and it has no integer kernel for a conv whose output stays float
(read by RoiAlign, an Add, a ConvTranspose, or by two quantizers as the RPN's shared conv is):
those run as float convs on dequantized weights, slower than the float model itself. Four rules,
each a pattern, a check that says why a match is left alone, and a rewrite, applied in order:

- `widen_uint8_weights` (target CPU 'vnni' only): 8-bit weights as full-range int8 codes, one
  product per layer, so that 8-bit convs fuse into QLinearConv;
- `integer_conv`: a conv whose output stays float as im2col on the integer codes and `DQ -> MatMul`;
- `integer_matmul`: a `DQ -> MatMul (-> Add bias)` whose output stays float (the linears, the
  im2col convs) as one MatMulIntegerToFloat with the bias inside;
- `split_uint8_weights` (any other target): 8-bit weights multiplied as two narrow int8 halves.

Each computes the same sums of the same code products as the op it replaces; only the float
rounding of the accumulation differs, as it does between any two conv kernels. Every quantizer
keeps its input and its codes, so the quantizer-call table is refreshed by `refresh_calls`.
Written here because onnxruntime's own quantization tools re-quantize a float graph (they would
change the arithmetic), and no maintained library rewrites an existing QDQ graph this way.
"""

from __future__ import annotations

import dataclasses

import onnx

from ..deploy_config import TARGET_ANY, TARGET_CPUS, TARGET_VNNI
from ..quant.kinds import LOG_SQRT2
from ..quantizer_calls import QuantizerCall
from .rules.integer_conv import INTEGER_CONV
from .rules.integer_matmul import INTEGER_MATMUL
from .rules.rule import Rule, apply_rule, apply_rules
from .rules.split_uint8_weights import SPLIT_UINT8_WEIGHTS
from .rules.widen_uint8_weights import WIDEN_UINT8_WEIGHTS

#: after the optional widening, in this order: the im2col convs' MatMuls then get their integer
#: kernel and bias, and what is left of 8-bit weights its two int8 halves
INTEGER_KERNEL_RULES: tuple[Rule, ...] = (INTEGER_CONV, INTEGER_MATMUL, SPLIT_UINT8_WEIGHTS)


def optimize_for_onnxruntime(proto: onnx.ModelProto, target_cpu: str = TARGET_ANY) -> str:
    """Every rule, in order: 8-bit weights widened first for target 'vnni' (so that 8-bit convs fuse
    into QLinearConv), then `INTEGER_KERNEL_RULES`.

    Returns the target CPU the rewritten graph needs: 'vnni' only where a weight was widened (a
    graph without 8-bit weights is the same for both targets and runs on every CPU)."""
    if target_cpu not in TARGET_CPUS:
        raise ValueError(f"optimize_for_onnxruntime: unknown target_cpu {target_cpu!r} (one of {TARGET_CPUS})")
    widened = apply_rule(proto, WIDEN_UINT8_WEIGHTS) if target_cpu == TARGET_VNNI else 0
    apply_rules(proto, INTEGER_KERNEL_RULES)
    return TARGET_VNNI if widened else TARGET_ANY


def refresh_calls(proto: onnx.ModelProto, calls: list[QuantizerCall]) -> list[QuantizerCall]:
    """The quantizer-call table after a rewrite: a uniform call's input is whatever its
    QuantizeLinear reads now (a split conv's clone), found from its codes."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = []
    for call in calls:
        node = producer.get(call.codes)
        if node is not None and node.op_type == "Clip":
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "QuantizeLinear" and call.kind != LOG_SQRT2:
            call = dataclasses.replace(call, x=node.input[0])
        out.append(call)
    return out
