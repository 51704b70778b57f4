"""The onnxruntime form of the exported graph: exact codes at the default optimization level, integer
kernels, W8A8 (target CPU any and vnni), its static rules, and the form reported by `check`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from repq_export.cli import main as cli_main
from repq_export.errors import UserError
from repq_export.evaluation.parity import compare_codes, find_code_probes, with_probe_outputs
from repq_export.export.artifact import ExportRequest, export_artifact
from repq_export.export.graph_index import index_graph
from repq_export.deploy_config import TARGET_ANY, TARGET_VNNI
from repq_export.export.forms import ONNXRUNTIME, TENSORRT, graph_form
from repq_export.graph_targets import graph_target_cpu
from repq_export.quantizer_calls import read_calls
from repq_export.export.onnx_export import count_qdq, export_onnx
from repq_export.export.ort_check import check_onnxruntime_form
from repq_export.quant.layers import named_quantizers
from repq_export.resources import DEPLOY_CONFIGS_DIR
from repq_export.runtime.cpu_features import saturation_free

from test_export import IMG_HW, tiny_quant_model

CASES = [("mask", 4, TARGET_ANY), ("cascade", 4, TARGET_ANY), ("mask", 6, TARGET_ANY), ("mask", 8, TARGET_ANY),
         ("mask", 8, TARGET_VNNI)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-w{b}a{b}" + (t == TARGET_VNNI) * "-vnni" for k, b, t in CASES])
def ort_graph(request, tmp_path_factory):
    kind, bits, target = request.param
    qmodel, img = tiny_quant_model(kind, bits)
    path = tmp_path_factory.mktemp(f"{kind}{bits}{target}") / "model.onnx"
    proto = export_onnx(qmodel, path, img, IMG_HW, form=ONNXRUNTIME, target_cpu=target)
    return bits, qmodel, img, path, proto


def one_u8s8_product(proto: onnx.ModelProto, bits: int) -> bool:
    """Whether every layer is one u8s8 product: always below 8 bits; at 8 bits for target 'vnni' only
    (8-bit weights as full-range int8), where 'any' splits each into two halves."""
    return bits < 8 or graph_target_cpu(proto) == TARGET_VNNI


def runs_here(proto: onnx.ModelProto) -> None:
    """Skip where this CPU's u8s8 kernels could saturate a 'vnni' graph (the runner refuses it there)."""
    if graph_target_cpu(proto) == TARGET_VNNI and not saturation_free():
        pytest.skip("target CPU 'vnni' graph: this CPU has no VNNI/AMX")


def tier1(qmodel, img, proto: onnx.ModelProto, level: str = "ORT_ENABLE_ALL") -> tuple[int, int]:
    """(elements, differing codes) of every quantizer call, onnxruntime at `level`."""
    probes = find_code_probes(proto, {n for n, _ in named_quantizers(qmodel)})
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    sess = ort.InferenceSession(with_probe_outputs(proto, probes).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in sess.get_outputs()],
                      sess.run(None, {"img": img.numpy(), "img_hw": IMG_HW.numpy()})))
    reports: dict = {}
    compare_codes(qmodel, probes, values, reports)
    return sum(r.elements for r in reports.values()), sum(r.mismatches for r in reports.values())


def test_tier1_is_zero_at_the_default_level(ort_graph):
    bits, qmodel, img, _, proto = ort_graph
    calls = read_calls(proto)
    assert {c.form for c in calls} == {ONNXRUNTIME} and {c.kind for c in calls} == {"uniform", "log_sqrt2"}
    assert graph_form(proto) == ONNXRUNTIME
    runs_here(proto)
    elements, differ = tier1(qmodel, img, proto)
    assert elements > 1_000_000 and differ == 0


def test_onnxruntime_runs_every_stride_1_conv_on_integer_kernels(ort_graph, tmp_path):
    """At the default level every quantized conv but the stride-4 patch embedding runs on an integer
    kernel (QLinearConv, or MatMulIntegerToFloat after the im2col rewrite; at 8 bits for target
    'any' every one is im2col, split into int8 halves), and the codes stay exact with and without
    onnxruntime's fusions. The detections themselves may differ between the two levels: integer
    kernels accumulate exactly where the float ones round (tiers 2/3 judge that)."""
    bits, qmodel, img, path, proto = ort_graph
    runs_here(proto)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    dets = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(
        None, {"img": img.numpy(), "img_hw": IMG_HW.numpy()})[0]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") >= 3 if one_u8s8_product(proto, bits) else ops.count("QLinearConv") == 0
    assert ops.count("QGemm") + ops.count("MatMulIntegerToFloat") >= 40
    assert ops.count("Conv") + ops.count("FusedConv") == 1  # backbone.patch_embed.proj (4x4, stride 4)
    assert len(dets) > 0
    for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
        assert tier1(qmodel, img, proto, level)[1] == 0, level


def test_weights_cannot_saturate_u8s8_kernels(ort_graph):
    """int8 weight codes stay within +-64 (2 x 255 x 64 <= 32767: no int16 saturation in the u8s8
    kernels of AVX2 CPUs without VNNI); 8-bit weights are uint8 with per-channel zero points. For
    target CPU 'vnni' they are full-range int8 instead, and the rule does not apply."""
    bits, qmodel, _, _, proto = ort_graph
    weights = sum(1 for n, _ in named_quantizers(qmodel) if n.endswith("weight_quantizer"))
    counts = count_qdq(proto)
    assert check_onnxruntime_form(proto) == []
    if graph_target_cpu(proto) == TARGET_VNNI:
        assert (counts["uint8_weights"], counts["int8_weights"]) == (0, weights)
        widest = max(np.abs(numpy_helper.to_array(i).astype(np.int64)).max() for i in proto.graph.initializer
                     if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1)
        assert widest > 64  # full range: the case the saturation rule exists for
        return
    assert (counts["uint8_weights"], counts["int8_weights"]) == ((weights, 0) if bits == 8 else (0, weights))
    for init in proto.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and len(init.dims) > 1:
            assert np.abs(numpy_helper.to_array(init).astype(np.int64)).max() <= 64
    assert check_onnxruntime_form(proto) == []


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    return broken


def test_a_wide_int8_weight_breaks_the_saturation_rule(ort_graph):
    bits, _, _, _, proto = ort_graph
    if bits == 8:
        pytest.skip("8-bit weights: uint8 (target 'any') or full-range int8 outside the rule (target 'vnni')")
    broken = _copy(proto)
    init = next(i for i in broken.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1)
    codes = numpy_helper.to_array(init).copy()
    codes.flat[0] = 100
    init.CopyFrom(numpy_helper.from_array(codes, init.name))
    assert [i.rule for i in check_onnxruntime_form(broken)] == ["u8s8-saturation"]


def test_tier1_fails_when_one_scale_is_off_by_one_step(ort_graph):
    """One activation QuantizeLinear's scale made one code step (1/2^n of its range) larger: that
    quantizer's codes differ, and tier 1 must say so."""
    bits, qmodel, img, _, proto = ort_graph
    runs_here(proto)
    broken = _copy(proto)
    calls = [c for c in read_calls(broken) if c.kind == "uniform" and c.name.startswith("neck.")]
    q_node = next(n for n in broken.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == calls[0].x)
    inits = {i.name: i for i in broken.graph.initializer}
    scale = numpy_helper.to_array(inits[q_node.input[1]])
    broken.graph.initializer.append(numpy_helper.from_array(scale * np.float32(1 + 2.0**-bits), "broken_scale"))
    q_node.input[1] = "broken_scale"
    elements, differ = tier1(qmodel, img, broken)
    assert elements > 1_000_000 and differ > 0


def test_rewrites_compute_the_shared_rpn_conv_once_and_move_codes_only(ort_graph):
    """The exported graph keeps a conv only where one QuantizeLinear reads it (a QLinearConv for
    onnxruntime) or it has a stride (the patch embedding); every float-output conv, the RPN conv
    its two quantizers read included, became Transpose/Pad/Gather on the codes and a
    MatMulIntegerToFloat. At 8 bits every stride-1 conv is im2col (QLinearConv would multiply
    uint8 by uint8)."""
    bits, _, _, _, proto = ort_graph
    ops = [n.op_type for n in proto.graph.node]
    readers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    relus = [n for n in proto.graph.node if n.op_type == "Relu" and n.name.startswith("/rpn_head/Relu")]
    assert relus and all(readers[r.output[0]] == ["QuantizeLinear"] * 2 for r in relus)
    for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
        out = conv.output[0]
        if readers[out] == ["Relu"]:
            out = next(n.output[0] for n in proto.graph.node if n.op_type == "Relu" and n.input[0] == out)
        stride = list(next(a.ints for a in conv.attribute if a.name == "strides"))
        assert stride != [1, 1] or (one_u8s8_product(proto, bits) and readers[out] == ["QuantizeLinear"]), conv.name
    pads = [n for n in proto.graph.node if n.op_type == "Pad" and n.name.endswith("/pad")]
    assert pads and ops.count("MatMulIntegerToFloat") > len(pads)


def test_float_output_matmuls_take_codes_and_bias_directly(ort_graph):
    """Every linear and im2col MatMul whose output stays float is one MatMulIntegerToFloat on the
    codes, with the bias inside: no DequantizeLinear -> MatMul on constant weights is left, and no
    Add adds a constant to a MatMulIntegerToFloat's output."""
    _, _, _, _, proto = ort_graph
    graph = index_graph(proto)
    mm = [n for n in graph.nodes if n.op_type == "MatMulIntegerToFloat"]
    assert len(mm) >= 40 and sum(len(n.input) == 7 for n in mm) >= 30
    for node in (n for n in graph.nodes if n.op_type == "MatMul"):
        producer = graph.producer.get(node.input[1])
        assert producer is None or producer.op_type != "DequantizeLinear" or not graph.is_constant(producer.input[0])
    for node in mm:
        assert graph.types[node.input[0]] == onnx.TensorProto.UINT8 and graph.folded(node.input[1]) is not None
        assert not any(r.op_type == "Add" and any(graph.is_constant(i) for i in r.input)
                       for r in graph.consumers.get(node.output[0], []))


def test_a_matmul_with_another_zero_point_breaks_the_chain_rule(ort_graph):
    """A MatMulIntegerToFloat reading codes with a zero point other than their QuantizeLinear's
    subtracts the wrong code for 0.0."""
    broken = _copy(ort_graph[4])
    node = next(n for n in broken.graph.node if n.op_type == "MatMulIntegerToFloat")
    value = int(index_graph(broken).constant(node.input[4]))
    broken.graph.initializer.append(numpy_helper.from_array(np.array((value + 1) % 256, np.uint8), "broken_zp"))
    node.input[4] = "broken_zp"
    issues = check_onnxruntime_form(broken)
    assert [(i.rule, i.op) for i in issues] == [("act-chain", "MatMulIntegerToFloat")]


def test_a_pad_with_another_code_breaks_the_chain_rule(ort_graph):
    """Padding the codes with anything but the zero point pads with a value other than 0.0."""
    broken = _copy(ort_graph[4])
    pad = next(n for n in broken.graph.node if n.op_type == "Pad" and n.name.endswith("/pad"))
    value = int(index_graph(broken).constant(pad.input[2]))
    broken.graph.initializer.append(numpy_helper.from_array(np.array((value + 1) % 256, np.uint8), "broken_zp"))
    pad.input[2] = "broken_zp"
    issues = check_onnxruntime_form(broken)
    assert [(i.rule, i.op) for i in issues] == [("act-chain", "Pad")]


def test_an_im2col_gather_indexed_by_codes_breaks_the_chain_rule(ort_graph):
    """The im2col Gather may move codes (its data input), never use them as indices."""
    broken = _copy(ort_graph[4])
    gather = next(n for n in broken.graph.node if n.op_type == "Gather" and n.name.endswith("/taps"))
    gather.input[1] = gather.input[0]
    assert ("act-chain", "Gather") in [(i.rule, i.op) for i in check_onnxruntime_form(broken)]


def test_an_im2col_gather_of_another_quantizers_codes_breaks_the_chain_rule(ort_graph):
    """Gathering the pixels of another quantizer's codes multiplies them with this one's scale and
    zero point: the MatMulIntegerToFloat no longer matches the QuantizeLinear its codes come from."""
    broken = _copy(ort_graph[4])
    gathers = [n for n in broken.graph.node if n.op_type == "Gather" and n.name.endswith("/taps")]
    gathers[0].input[0] = gathers[-1].input[0]
    assert ("act-chain", "MatMulIntegerToFloat") in [(i.rule, i.op) for i in check_onnxruntime_form(broken)]


def test_check_reports_each_form(ort_graph, tmp_path, capsys):
    bits, qmodel, img, path, _ = ort_graph
    assert cli_main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "graph form: onnxruntime" in out and f"target CPU: {graph_target_cpu(ort_graph[4])} (" in out
    if bits == 4:
        trt = export_onnx(qmodel, tmp_path / "trt.onnx", img, IMG_HW, form=TENSORRT)
        assert graph_form(trt) == TENSORRT and {c.form for c in read_calls(trt)} == {TENSORRT}
        assert cli_main(["check", str(tmp_path / "trt.onnx")]) == 0
        out = capsys.readouterr().out
        assert "graph form: tensorrt" in out and "TensorRT compatibility: no issues found" in out
        assert [i.rule for i in check_onnxruntime_form(trt)].count("act-type") > 0  # the other form's rules fail


def test_tensorrt_form_refuses_8_bits_before_calibration(tmp_path):
    deploy = DEPLOY_CONFIGS_DIR / "instance-seg_tensorrt-int8_static-800x1344.py"
    req = ExportRequest(ckpt=Path("does-not-exist.pth"), out=tmp_path / "art", w_bits=8, a_bits=8,
                        deploy_config=deploy)
    with pytest.raises(UserError, match="TensorRT form carries 2..7-bit codes"):
        export_artifact(req, progress=False, log=lambda *_: None)
    assert not (tmp_path / "art").exists()


def test_the_runner_refuses_a_vnni_graph_on_a_cpu_without_vnni(ort_graph, monkeypatch):
    """On an x86 CPU with AVX2 but no VNNI/AMX, a target-'vnni' graph is refused in one line (its
    full-range int8 weights could saturate there); a target-'any' graph runs. ARM64 runs both."""
    from repq_export.runtime import cpu_features
    from repq_export.runtime.ort_runner import OrtRunner

    _, _, _, path, proto = ort_graph
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda *_: {"sse4_2", "avx2", "fma"})
    if graph_target_cpu(proto) == TARGET_VNNI:
        with pytest.raises(UserError, match="exported for target CPU 'vnni'.*none of avx512_vnni"):
            OrtRunner(path)
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda *_: None)  # /proc/cpuinfo unreadable: refused too
        with pytest.raises(UserError, match="target CPU 'vnni'"):
            OrtRunner(path)
        monkeypatch.setattr(cpu_features.platform, "machine", lambda: "aarch64")
    OrtRunner(path)


def test_cpu_features_read_the_vnni_flags(tmp_path):
    from repq_export.runtime.cpu_features import cpu_flags, saturation_free

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n\nprocessor\t: 1\n")
    assert "avx512_vnni" in cpu_flags(info) and cpu_flags(tmp_path / "missing") is None
    assert saturation_free("x86_64", cpu_flags(info))
    assert saturation_free("x86_64", {"avx2", "avx_vnni"}) and saturation_free("x86_64", {"amx_int8"})
    assert not saturation_free("x86_64", {"avx2", "avx512f"}) and not saturation_free("x86_64", set())
    assert saturation_free("aarch64", set())


def test_target_vnni_without_8_bit_weights_is_the_portable_graph(tmp_path):
    """Below 8 bits there is nothing to widen: target 'vnni' writes the byte-identical graph of
    target 'any', recorded as 'any', so it runs on every CPU."""
    qmodel, img = tiny_quant_model("mask", 4)
    protos = [export_onnx(qmodel, tmp_path / f"{t}.onnx", img, IMG_HW, form=ONNXRUNTIME, target_cpu=t)
              for t in (TARGET_ANY, TARGET_VNNI)]
    assert graph_target_cpu(protos[1]) == TARGET_ANY
    assert (tmp_path / "any.onnx").read_bytes() == (tmp_path / "vnni.onnx").read_bytes()


def test_an_unknown_target_cpu_is_reported_and_refused(ort_graph, tmp_path):
    """A graph whose metadata names a target CPU this version does not know fails `check`'s
    target-cpu rule, and the runner refuses it on any CPU."""
    from repq_export.export.forms import set_target_cpu
    from repq_export.runtime.ort_runner import OrtRunner

    broken = _copy(ort_graph[4])
    set_target_cpu(broken, "avx10")
    rules = {i.rule for i in check_onnxruntime_form(broken)}
    # a widened 'vnni' graph then also meets the +-64 rule again, which only 'vnni' lifts
    assert rules == ({"target-cpu", "u8s8-saturation"} if graph_target_cpu(ort_graph[4]) == TARGET_VNNI
                     else {"target-cpu"})
    onnx.save(broken, str(tmp_path / "model.onnx"))
    with pytest.raises(UserError, match="unknown target CPU 'avx10'"):
        OrtRunner(tmp_path / "model.onnx")
