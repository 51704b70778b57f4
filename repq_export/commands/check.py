"""`repq-export check`: an ONNX graph's form, and its backend's rules checked without the backend."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .common import CommandParser


def run_check(argv: list[str]) -> int:
    p = CommandParser(prog="repq-export check", description="Say which form an ONNX graph has (TensorRT: "
                      "int8 Q/DQ with zero point 0; onnxruntime: uint8 activations with the range clipped "
                      "after QuantizeLinear) and check it against its backend's rules: TensorRT's documented "
                      "rules for explicit quantization (zero points, per-channel activations, Q/DQ types and "
                      "placement, unsupported ops), or what keeps the onnxruntime form exact on integer "
                      "kernels (uint8 chains, int16 saturation of u8s8 kernels, the target CPU it was exported for). "
                      "Exit 1 if any error is found. "
                      "Needs no TensorRT.")
    p.add_argument("model", type=Path, help="ONNX file (or an artifact directory)")
    args = p.parse_args(argv)
    from ..artifact.artifact_file import onnx_file_of, read_manifest
    from ..artifact.folder import MANIFEST
    from ..export.forms import ONNXRUNTIME, OPENVINO, graph_form
    from ..export.ort_check import check_onnxruntime_form, format_ort_report
    from ..export.trt_check import check_tensorrt_compat, format_report
    from ..graph_targets import TargetCpu, graph_target_cpu

    path = onnx_file_of(args.model) if args.model.is_dir() else args.model
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    proto = read_onnx(path)
    if args.model.is_dir() and (args.model / MANIFEST).exists() and read_manifest(args.model).get("form") == OPENVINO:
        print("graph form: openvino (from repq.json; int8 codes where they fit, uint8 activations at 8 bits): "
              "OpenVINO reads any Q/DQ graph, so there are no backend rules to check; its verdict is "
              "tools/parity_check.py --backend openvino (the float64 rule)")
        issues = not_quantized(proto)
        for issue in issues:
            print(f"  error   [{issue.rule}] {issue.message}")
        return 1 if issues else 0
    form = graph_form(proto)
    print(f"graph form: {form}" + {"tensorrt": " (int8 Q/DQ, zero point 0): checked against TensorRT's rules",
                                   "onnxruntime": " (uint8 activations): checked against the onnxruntime-form "
                                   "rules; not a TensorRT graph (TensorRT reads uint8 zero points as int8)",
                                   "float": " (no QuantizeLinear): checked against TensorRT's rules",
                                   "mixed": " (int8 and uint8 activations): checked against both"}[form])
    issues = not_quantized(proto)
    if form != ONNXRUNTIME:
        issues += check_tensorrt_compat(proto)
        print(format_report(issues))
    if form in (ONNXRUNTIME, "mixed"):
        target = graph_target_cpu(proto)
        print(f"target CPU: {target}" + {
            TargetCpu.ANY: " (int8 weight codes within +-64: exact on every CPU)",
            TargetCpu.VNNI: " (8-bit weights as full-range int8: exact only on x86 CPUs with AVX-512 VNNI, "
                         "AVX-VNNI or AMX, and on ARM64; the onnxruntime runner refuses other CPUs)"}.get(target, ""))
        ort = check_onnxruntime_form(proto)
        print(format_ort_report(ort))
        issues += ort
    return 1 if any(i.severity == "error" for i in issues) else 0


def read_onnx(path: Path):
    """The ONNX model in `path`, checked by onnx.checker; UserError if it is not a valid ONNX model."""
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UserError(f"{path}: not an ONNX model (cannot be parsed: {type(exc).__name__})") from None
    if proto.ir_version == 0 or not proto.graph.node:  # protobuf reads an empty file as an empty model
        raise UserError(f"{path}: not an ONNX model ({'empty file' if path.stat().st_size == 0 else 'no graph'})")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx.checker.ValidationError, also for what the C++ side refuses
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"{path}: not a valid ONNX model (onnx.checker: {text[:300]})") from None
    return proto


def not_quantized(proto) -> list:
    """An error where the graph has no Q/DQ node at all: a float model, nothing for int8 to run."""
    from ..export.graph_index import Issue

    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        return []
    return [Issue("(graph)", "-", "not-quantized", "no QuantizeLinear/DequantizeLinear node: a float graph, "
                  "not a quantized (QDQ) model")]
