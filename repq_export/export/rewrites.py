"""Graph rewrites of the onnxruntime form that let onnxruntime run every quantized conv and
linear on integer kernels, without changing what any quantizer sees.

onnxruntime fuses `DQ -> Conv (-> Relu) -> Q` into QLinearConv, but only where exactly one
QuantizeLinear reads the conv, and it has no integer kernel for a conv whose output stays float
(read by RoiAlign, an Add, a ConvTranspose, or by two quantizers as the RPN's shared conv is):
those run as float convs on dequantized weights, slower than the float model itself. Three
rewrites, each a pattern, a check and a rewrite:

- `integer_conv`: a conv whose output stays float is written as im2col on the integer codes
  (NHWC Transpose, Pad with the zero point's code, one Gather of the kh*kw taps' pixels) and a
  `DQ -> MatMul` over (kh*kw*C, K) weight codes. Padding with the zero point's code is padding
  with 0.0, as the conv does. (Cloning the RPN conv once per quantizer, so that each clone fuses
  into a QLinearConv, measured about 120 ms slower at 800x1216 on one thread than one im2col.)
- `integer_matmul`: a `DQ -> MatMul (-> Add bias)` on constant weight codes whose output stays
  float (the linears, the im2col convs) becomes one MatMulIntegerToFloat on the codes with the
  bias inside; onnxruntime's own fusion would leave the Add as one more pass over the output.
- `split_uint8_weights`: 8-bit weights (uint8 codes, zero point per channel) multiplied as two
  narrow int8 halves, so that onnxruntime runs u8s8 kernels that cannot saturate.
- `widen_uint8_weights` (target CPU 'vnni' only, instead of the split): the same weights as
  full-range int8 codes q - 128 with int8 zero points zp - 128, one product per layer; exact only
  where u8s8 kernels cannot saturate (VNNI, AMX, ARM64), which the runner checks.

Each computes the same sums of the same code products as the op it replaces; only the float
rounding of the accumulation differs, as it does between any two conv kernels. Every quantizer
keeps its input and its codes, so the quantizer-call table is refreshed by `refresh_calls`.
Written here because onnxruntime's own quantization tools re-quantize a float graph (they would
change the arithmetic), and no maintained library rewrites an existing QDQ graph this way.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..deploy_config import TARGET_ANY, TARGET_CPUS, TARGET_VNNI
from .graph_index import Graph, index_graph, node_attr, zero_point_input
from .locations import QuantizerCall

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (MatMulIntegerToFloat)


def optimize_for_onnxruntime(proto: onnx.ModelProto, target_cpu: str = TARGET_ANY) -> str:
    """Every rewrite, in order: the im2col convs' MatMuls and the linears' then get their integer
    kernel and bias, and 8-bit weights their two int8 halves (target 'any') or one full-range int8
    product (target 'vnni', widened first so that 8-bit convs fuse into QLinearConv).

    Returns the target CPU the rewritten graph needs: 'vnni' only where a weight was widened (a
    graph without 8-bit weights is the same for both targets and runs on every CPU)."""
    if target_cpu not in TARGET_CPUS:
        raise ValueError(f"optimize_for_onnxruntime: unknown target_cpu {target_cpu!r} (one of {TARGET_CPUS})")
    widened = widen_uint8_weights(proto) if target_cpu == TARGET_VNNI else 0
    integer_conv(proto)
    integer_matmul(proto)
    split_uint8_weights(proto)
    return TARGET_VNNI if widened else TARGET_ANY


# ----------------------------------------------------------------------------- float-output convs


def _conv_chain(graph: Graph, conv: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The conv and, where the conv's only reader is a Relu, that Relu."""
    readers = graph.consumers.get(conv.output[0], [])
    if len(readers) == 1 and readers[0].op_type == "Relu" and conv.output[0] not in graph.outputs:
        return [conv, readers[0]]
    return [conv]


def _reads_codes(graph: Graph, conv: onnx.NodeProto) -> bool:
    """Whether the conv's input and weight both come from DequantizeLinear (a quantized conv)."""
    x, w = (graph.producer.get(name) for name in conv.input[:2])
    return all(p is not None and p.op_type == "DequantizeLinear" for p in (x, w))


@dataclasses.dataclass
class _ConvMatch:
    """A quantized conv `integer_conv` can rewrite: its nodes and the constants it needs."""

    conv: onnx.NodeProto
    x_dq: onnx.NodeProto
    w_dq: onnx.NodeProto
    weight: np.ndarray  # (K, C, kh, kw) weight codes
    pads: list[int]  # top, left, bottom, right


def _match_float_output_conv(graph: Graph, conv: onnx.NodeProto) -> _ConvMatch | None:
    """Pattern and check: a stride-1, ungrouped, undilated conv of uint8 activation codes and
    constant per-output-channel weight codes, whose output onnxruntime would not fuse."""
    if conv.op_type != "Conv" or not _reads_codes(graph, conv):
        return None
    x_dq, w_dq = graph.producer[conv.input[0]], graph.producer[conv.input[1]]
    weight = graph.constant(w_dq.input[0])
    x_zp = graph.constant(zero_point_input(x_dq))
    if weight is None or weight.ndim != 4 or x_zp is None or x_zp.size != 1:
        return None
    if graph.types.get(zero_point_input(x_dq)) != TensorProto.UINT8 or node_attr(w_dq, "axis", 1) != 0:
        return None
    if node_attr(conv, "group", 1) != 1 or node_attr(conv, "auto_pad", "NOTSET") != "NOTSET":
        return None
    if any(s != 1 for s in node_attr(conv, "strides", [1, 1])) or any(d != 1 for d in node_attr(conv, "dilations", [1, 1])):
        return None
    readers = graph.consumers.get(_conv_chain(graph, conv)[-1].output[0], [])
    if len(readers) == 1 and readers[0].op_type == "QuantizeLinear" and weight.dtype != np.uint8:
        return None  # onnxruntime makes this a QLinearConv already (a fast one: int8 weights)
    pads = list(node_attr(conv, "pads", [0, 0, 0, 0]))
    return _ConvMatch(conv, x_dq, w_dq, weight, [pads[0], pads[1], pads[2], pads[3]])


def _im2col_conv(m: _ConvMatch, add_init) -> list[onnx.NodeProto]:
    """The rewrite: NHWC codes -> Pad(zero point) -> Gather of the kh*kw taps -> DQ -> MatMul over
    (kh*kw*C, K) weight codes (+ bias) -> NCHW, writing the conv's own output name."""
    name, (k_out, c_in, kh, kw) = m.conv.name or m.conv.output[0], m.weight.shape
    codes, scale, zp = m.x_dq.input[0], m.x_dq.input[1], zero_point_input(m.x_dq)
    nodes = [helper.make_node("Transpose", [codes], [f"{name}/nhwc"], name=f"{name}/nhwc", perm=[0, 2, 3, 1])]
    cols = f"{name}/nhwc"
    top, left, bottom, right = m.pads
    if any(m.pads):
        pads = add_init(f"{name}/pads", np.array([0, top, left, 0, 0, bottom, right, 0], np.int64))
        nodes.append(helper.make_node("Pad", [cols, pads, zp], [f"{name}/padded"], name=f"{name}/pad", mode="constant"))
        cols = f"{name}/padded"
    if kh * kw > 1:
        nodes += _gather_taps(name, cols, kh, kw, c_in, add_init)
        cols = f"{name}/im2col"
    nodes.append(helper.make_node("DequantizeLinear", [cols, scale, zp], [f"{name}/cols_dq"], name=f"{name}/cols_dq"))
    # (kh, kw, C) order along the rows, as the Gather lays the taps out
    matrix = np.ascontiguousarray(m.weight.transpose(2, 3, 1, 0).reshape(kh * kw * c_in, k_out))
    # named after the conv's weight, so the calls of a shared conv (the RPN's, once per level) share it
    w_inputs = [add_init(f"{m.w_dq.input[0]}/im2col", matrix), m.w_dq.input[1]]
    if zero_point_input(m.w_dq):
        w_inputs.append(zero_point_input(m.w_dq))
    nodes.append(helper.make_node("DequantizeLinear", w_inputs, [f"{name}/weight_dq"], name=f"{name}/weight_dq", axis=1))
    nodes.append(helper.make_node("MatMul", [f"{name}/cols_dq", f"{name}/weight_dq"], [f"{name}/matmul"],
                                  name=f"{name}/matmul"))
    out = f"{name}/matmul"
    if len(m.conv.input) > 2 and m.conv.input[2]:
        nodes.append(helper.make_node("Add", [out, m.conv.input[2]], [f"{name}/bias"], name=f"{name}/bias"))
        out = f"{name}/bias"
    nodes.append(helper.make_node("Transpose", [out], [m.conv.output[0]], name=f"{name}/nchw", perm=[0, 3, 1, 2]))
    return nodes


def _gather_taps(name: str, padded: str, kh: int, kw: int, channels: int, add_init) -> list[onnx.NodeProto]:
    """im2col of NHWC codes (N, Hp, Wp, C) as one Gather of whole pixels: row (n, h, w) of the
    result holds pixels (n, h + i, w + j) for every tap (i, j), so `{name}/im2col` is
    (N, H, W, kh*kw*C).

    The pixel indices (n * Hp + h + i) * Wp + (w + j) are computed from the shape at run time
    (batch, height and width stay dynamic: the mask head's convs see one image per RoI). One
    Gather copying C-byte rows, parallel over rows, was 1.3-1.7x faster than kh*kw Slices and a
    Concat at 200x304x256 (onnxruntime 1.32, 1-2 threads), with the same matrix."""
    def node(op: str, inputs: list[str], out: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{name}/{out}"], name=f"{name}/{out}", **attrs)

    def const(suffix: str, value) -> str:
        return add_init(f"{name}/{suffix}", np.array(value, np.int64))

    taps_i, taps_j = np.divmod(np.arange(kh * kw, dtype=np.int64), kw)  # tap t = (i, j), row-major
    return [
        node("Shape", [padded], "shape"),
        node("Gather", [f"{name}/shape", const("axis0", 0)], "n", axis=0),
        node("Gather", [f"{name}/shape", const("axis1", 1)], "hp", axis=0),
        node("Gather", [f"{name}/shape", const("axis2", 2)], "wp", axis=0),
        node("Sub", [f"{name}/hp", const("kh_1", kh - 1)], "h"),
        node("Sub", [f"{name}/wp", const("kw_1", kw - 1)], "w"),
        # every -1 of the index reshapes below stands beside 1s only: inferred from 0 images too
        node("Range", [const("zero", 0), f"{name}/n", const("one", 1)], "images"),
        node("Mul", [f"{name}/images", f"{name}/hp"], "image_rows"),
        node("Reshape", [f"{name}/image_rows", const("as_n", [-1, 1, 1, 1])], "image_index"),
        node("Range", [const("zero", 0), f"{name}/h", const("one", 1)], "rows"),
        node("Range", [const("zero", 0), f"{name}/w", const("one", 1)], "cols"),
        node("Reshape", [f"{name}/rows", const("as_h", [1, -1, 1, 1])], "row_in_image"),
        node("Add", [f"{name}/image_index", f"{name}/row_in_image"], "row"),  # n * Hp + h
        node("Mul", [f"{name}/row", f"{name}/wp"], "row_index"),
        node("Reshape", [f"{name}/cols", const("as_w", [1, 1, -1, 1])], "col_index"),
        node("Mul", [const("taps_i", taps_i), f"{name}/wp"], "tap_rows"),
        node("Add", [f"{name}/tap_rows", const("taps_j", taps_j)], "tap_offsets"),
        node("Reshape", [f"{name}/tap_offsets", const("as_t", [1, 1, 1, -1])], "tap_index"),
        node("Add", [f"{name}/row_index", f"{name}/col_index"], "pixel_index"),
        node("Add", [f"{name}/pixel_index", f"{name}/tap_index"], "index"),  # (N, H, W, kh*kw)
        # -1 is the only unknown dim and C > 0, so it is inferred even from 0 elements (no RoI)
        node("Reshape", [padded, const("as_pixels", [-1, channels])], "pixels"),
        node("Gather", [f"{name}/pixels", f"{name}/index"], "taps", axis=0),  # (N, H, W, kh*kw, C)
        # the row width is written out: a -1 beside a copied 0 (N = 0 RoIs) cannot be inferred
        node("Reshape", [f"{name}/taps", const("as_rows", [0, 0, 0, kh * kw * channels])], "im2col"),
    ]


def integer_conv(proto: onnx.ModelProto) -> int:
    """Rewrite every quantized conv whose output stays float as im2col + integer MatMul.
    Returns the number rewritten."""
    graph = index_graph(proto)
    matches = {m.conv.output[0]: m for m in (_match_float_output_conv(graph, n) for n in graph.nodes) if m}
    if not matches:
        return 0
    new_inits: list[onnx.TensorProto] = []
    add_init = _initializer_adder(proto, new_inits)
    replaced = {id(m.conv) for m in matches.values()}
    nodes = []
    for node in graph.nodes:
        if id(node) in replaced:
            nodes.extend(_im2col_conv(matches[node.output[0]], add_init))
        else:
            nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(new_inits)
    remove_unused(proto)
    return len(matches)


# ----------------------------------------------------------------------------- float-output matmuls


@dataclasses.dataclass
class _MatMulMatch:
    """A quantized MatMul `integer_matmul` can rewrite, and the Add that adds its bias."""

    matmul: onnx.NodeProto
    x_dq: onnx.NodeProto
    w_dq: onnx.NodeProto
    bias: np.ndarray | None
    add: onnx.NodeProto | None


def _constant_bias(graph: Graph, name: str, width: int) -> np.ndarray | None:
    """A float32 (width,) bias constant, or DequantizeLinear of an int32 one, as float32 values."""
    value = graph.constant(name)
    producer = graph.producer.get(name)
    if value is None and producer is not None and producer.op_type == "DequantizeLinear":
        k, step = graph.constant(producer.input[0]), graph.constant(producer.input[1])
        zp = graph.constant(zero_point_input(producer))
        if k is None or step is None or k.dtype != np.int32 or (zp is not None and np.any(zp)):
            return None
        value = k.astype(np.float32) * step.astype(np.float32)  # what DequantizeLinear computes
    if value is None or value.dtype != np.float32 or value.shape != (width,):
        return None
    return value


def _match_float_output_matmul(graph: Graph, matmul: onnx.NodeProto) -> _MatMulMatch | None:
    """Pattern and check: MatMul(DQ(uint8 codes, scalar scale and zero point), DQ(constant 2-D
    weight codes, per-column or scalar scale)) whose output stays float."""
    if matmul.op_type != "MatMul":
        return None
    x_dq, w_dq = (graph.producer.get(name) for name in matmul.input[:2])
    if any(p is None or p.op_type != "DequantizeLinear" for p in (x_dq, w_dq)):
        return None
    x_zp, weight = zero_point_input(x_dq), graph.constant(w_dq.input[0])
    if graph.types.get(x_zp) != TensorProto.UINT8 or graph.constant(x_zp) is None or graph.constant(x_zp).size != 1:
        return None
    scale = graph.constant(w_dq.input[1])
    if weight is None or weight.ndim != 2 or scale is None or graph.constant(x_dq.input[1]) is None:
        return None
    if scale.size != 1 and (node_attr(w_dq, "axis", 1) not in (1, -1) or scale.shape != (weight.shape[1],)):
        return None
    readers = graph.consumers.get(matmul.output[0], [])
    if matmul.output[0] in graph.outputs or (
            len(readers) == 1 and readers[0].op_type == "QuantizeLinear" and weight.dtype != np.uint8):
        return None  # a graph output, or onnxruntime makes it a QLinearMatMul already
    if len(readers) == 1 and readers[0].op_type == "Add":
        add = readers[0]
        other = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
        bias = _constant_bias(graph, other, weight.shape[1])
        if bias is not None:
            return _MatMulMatch(matmul, x_dq, w_dq, bias, add)
    return _MatMulMatch(matmul, x_dq, w_dq, None, None)


def _matmul_integer_to_float(m: _MatMulMatch, add_init) -> onnx.NodeProto:
    """The rewrite: one com.microsoft MatMulIntegerToFloat on the codes, with the bias inside."""
    name = m.matmul.name or m.matmul.output[0]
    inputs = [m.x_dq.input[0], m.w_dq.input[0], m.x_dq.input[1], m.w_dq.input[1], zero_point_input(m.x_dq),
              zero_point_input(m.w_dq)]
    out = m.matmul.output[0]
    if m.bias is not None:
        inputs.append(add_init(f"{name}/bias", m.bias))
        out = m.add.output[0]
    return helper.make_node("MatMulIntegerToFloat", inputs, [out], name=f"{name}/integer", domain=MS_DOMAIN)


def integer_matmul(proto: onnx.ModelProto) -> int:
    """Write every quantized MatMul whose output stays float (the linears, the im2col convs) as
    MatMulIntegerToFloat with its bias inside. onnxruntime forms that op itself from `DQ -> MatMul`
    but leaves the bias Add as a separate pass over the output. Returns the number rewritten."""
    graph = index_graph(proto)
    matches = {id(m.matmul): m for m in (_match_float_output_matmul(graph, n) for n in graph.nodes) if m}
    if not matches:
        return 0
    adds = {id(m.add) for m in matches.values() if m.add is not None and m.bias is not None}
    new_inits: list[onnx.TensorProto] = []
    add_init = _initializer_adder(proto, new_inits)
    nodes = []
    for node in graph.nodes:
        if id(node) in matches:
            nodes.append(_matmul_integer_to_float(matches[id(node)], add_init))
        elif id(node) not in adds:
            nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(new_inits)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    remove_unused(proto)
    return len(matches)


def _initializer_adder(proto: onnx.ModelProto, new_inits: list[onnx.TensorProto]):
    """add_init(name, value) -> name: a new initializer, once per name, collected in new_inits."""
    names = {i.name for i in proto.graph.initializer}

    def add_init(name: str, value: np.ndarray) -> str:
        if name not in names:
            names.add(name)
            new_inits.append(numpy_helper.from_array(value, name))
        return name

    return add_init


# ----------------------------------------------------------------------------- 8-bit weights


def _split_expression(codes: str, zp: str, add_init) -> tuple[list[onnx.NodeProto], str, str]:
    """Nodes computing int8 hi, lo with codes - zp = 16 hi + lo from the stored uint8 codes and
    their per-column zero points: lo = (codes - zp) mod 16 in 0..15, hi = (codes - zp - lo) / 16 in
    -16..15. Kept as an expression so the file stores the weight once; onnxruntime folds it when
    the session opens."""
    def node(op: str, inputs: list[str], out: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{codes}/{out}"], name=f"{codes}/{out}", **attrs)

    sixteen = add_init(f"{codes}/sixteen", np.array(16, np.int16))
    nodes = [node("Cast", [codes], "i16", to=TensorProto.INT16),
             node("Cast", [zp], "zp_i16", to=TensorProto.INT16),
             node("Sub", [f"{codes}/i16", f"{codes}/zp_i16"], "signed"),
             node("Mod", [f"{codes}/signed", sixteen], "lo_i16", fmod=0),
             node("Sub", [f"{codes}/signed", f"{codes}/lo_i16"], "hi_x16"),
             node("Div", [f"{codes}/hi_x16", sixteen], "hi_i16"),
             node("Cast", [f"{codes}/hi_i16"], "hi", to=TensorProto.INT8),
             node("Cast", [f"{codes}/lo_i16"], "lo", to=TensorProto.INT8)]
    return nodes, f"{codes}/hi", f"{codes}/lo"


def split_uint8_weights(proto: onnx.ModelProto) -> int:
    """Write each MatMulIntegerToFloat on uint8 weight codes (8-bit weights, zero point per column)
    as two on int8 codes: A @ (codes - zp) = 16 (A @ hi) + (A @ lo), added in float.

    onnxruntime runs uint8 x uint8 products on slow kernels (about 4x slower than uint8 x int8
    here); int8 codes of 8-bit weights (q - zp reaches +-255) do not fit int8, and even shifted
    by 128 would saturate u8s8 kernels on AVX2 CPUs without VNNI. hi and lo stay within +-16.
    Returns the number of MatMuls split."""
    graph = index_graph(proto)
    targets = [n for n in graph.nodes if n.op_type == "MatMulIntegerToFloat" and len(n.input) > 5 and n.input[5]
               and graph.types.get(n.input[1]) == TensorProto.UINT8 and graph.is_constant(n.input[1])]
    if not targets:
        return 0
    new_inits: list[onnx.TensorProto] = []
    add_init = _initializer_adder(proto, new_inits)
    derived: dict[str, tuple[str, str]] = {}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for mm in targets:
        codes, scale, zp = mm.input[1], mm.input[3], mm.input[5]
        expression = []  # hi and lo, computed just before their first reader (graph order stays topological)
        if codes not in derived:
            expression, hi, lo = _split_expression(codes, zp, add_init)
            derived[codes] = (hi, lo)
        hi, lo = derived[codes]
        scale16 = add_init(f"{scale}/x16", graph.constant(scale) * np.float32(16))  # exact: a power of two
        name, out, bias = mm.name or mm.output[0], mm.output[0], list(mm.input[6:7])
        a = [mm.input[0]]
        replaced[id(mm)] = expression + [
            helper.make_node("MatMulIntegerToFloat", a + [hi, mm.input[2], scale16, mm.input[4], ""] + bias,
                             [f"{out}/hi"], name=f"{name}/hi", domain=MS_DOMAIN),
            helper.make_node("MatMulIntegerToFloat", a + [lo, mm.input[2], scale, mm.input[4]], [f"{out}/lo"],
                             name=f"{name}/lo", domain=MS_DOMAIN),
            helper.make_node("Add", [f"{out}/hi", f"{out}/lo"], [out], name=f"{name}/hi_plus_lo")]
    nodes = [x for n in graph.nodes for x in replaced.get(id(n), [n])]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(new_inits)
    remove_unused(proto)
    return len(targets)


def widen_uint8_weights(proto: onnx.ModelProto) -> int:
    """Store each 8-bit weight (uint8 codes q, uint8 zero point per channel, read only by
    DequantizeLinear) as int8 codes q - 128 with int8 zero points zp - 128: the same q - zp, so
    DequantizeLinear gives the same values, but onnxruntime now multiplies on one u8s8 kernel
    (QLinearConv, MatMulIntegerToFloat with per-column zero points) instead of two halves.

    Full-range int8 weights saturate the u8s8 kernels of AVX2 CPUs without VNNI, so a graph with
    them is marked for target CPU 'vnni' (`forms.set_target_cpu`) and its runner refuses other
    CPUs. Returns the number of weights widened."""
    graph = index_graph(proto)
    inits = {i.name: i for i in proto.graph.initializer}
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op_type != "DequantizeLinear":
            continue
        codes, zp = node.input[0], zero_point_input(node)
        if codes in inits and zp in inits and inits[codes].data_type == TensorProto.UINT8 and len(inits[codes].dims) > 1 \
                and inits[zp].data_type == TensorProto.UINT8 and len(inits[zp].dims) == 1:
            pairs[codes] = zp
    # every reader of a widened tensor must be a weight DequantizeLinear, or its values would change
    readers_ok = all(r.op_type == "DequantizeLinear" and r.input[0] in pairs and zero_point_input(r) == pairs[r.input[0]]
                     for name in {*pairs, *pairs.values()} for r in graph.consumers.get(name, []))
    if not pairs or not readers_ok:
        return 0
    for name in {*pairs, *pairs.values()}:
        value = numpy_helper.to_array(inits[name]).astype(np.int16) - 128
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.int8), name))
    return len(pairs)


def remove_unused(proto: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing reads any more (the replaced convs' DequantizeLinear)."""
    graph = proto.graph
    needed = {o.name for o in graph.output} | _names_read_by_subgraphs(graph)
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _names_read_by_subgraphs(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of a subgraph (If/Loop bodies) reads: outer values stay alive."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names.update(i for n in sub.node for i in n.input if i)
                names |= _names_read_by_subgraphs(sub)
    return names


def refresh_calls(proto: onnx.ModelProto, calls: list[QuantizerCall]) -> list[QuantizerCall]:
    """The quantizer-call table after a rewrite: a uniform call's input is whatever its
    QuantizeLinear reads now (a split conv's clone), found from its codes."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = []
    for call in calls:
        node = producer.get(call.codes)
        if node is not None and node.op_type == "Clip":
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "QuantizeLinear" and call.kind != "log_sqrt2":
            call = dataclasses.replace(call, x=node.input[0])
        out.append(call)
    return out
