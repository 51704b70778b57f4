"""`repq-export`: checkpoint -> calibrated RepQ-ViT -> exact QDQ ONNX (+ TensorRT engine).

    repq-export --ckpt model.pth --bits 4 --calib images/      export an artifact directory
    repq-export check model.onnx                               the graph's form and its backend's rules
    repq-export demo                                           the whole pipeline on the bundled models
    repq-export predict ARTIFACT IMAGE --save out.png          draw detections
    repq-export serve ARTIFACT / infer URL IMAGE / triton-repo ARTIFACT OUT   serving ([serve] extra)
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from .commands.common import (CommandParser, bits, default_device, device, max_pixels_option, non_negative_int,
                              positive_int, run_command)
from .commands.recon_options import add_recon_options, recon_settings
from .errors import UserError

# Several images spread over the set: one image can misfit the rest (tools/diagnose_calibration.py). Eight
# keep the lockstep calibration's memory (eight forwards alive at once) within a few GB at full size.
DEFAULT_CALIB_IMAGES = 8
# Held-out images for the calibration check: a calibration fits its own images best, so misfits show on others.
DEFAULT_HOLDOUT = 8
SUBCOMMANDS = ("export", "check", "demo", "predict", "serve", "infer", "triton-repo")


def export_parser(prog: str = "repq-export") -> argparse.ArgumentParser:
    p = CommandParser(
        prog=prog, description="Calibrate RepQ-ViT on a Swin Mask R-CNN / Cascade Mask R-CNN checkpoint and "
        "write an artifact directory: model.onnx (QDQ, exact to fake quant), quant.pth, repq.json "
        "and, with --engine, model.engine. Other commands: check, demo, predict, serve, infer, triton-repo "
        "(repq-export demo --help).")
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint (.pth) from Swin-Transformer-Object-"
                   "Detection (mmdet 2.x keys) or mmdetection 3.x")
    p.add_argument("--config", type=Path, help="mmdet-style config; default: the architecture is read off the "
                   "checkpoint and the reference's test settings are used")
    p.add_argument("--bits", type=bits, help="weight and activation bits (2..8 with an onnxruntime deploy config; "
                   "2..7 with a TensorRT one)")
    p.add_argument("--w-bits", "--w_bits", dest="w_bits", type=bits, help="weight bits (overrides --bits)")
    p.add_argument("--a-bits", "--a_bits", dest="a_bits", type=bits, help="activation bits (overrides --bits)")
    p.add_argument("--calib", type=Path, help="folder of calibration images (taken sorted by name)")
    p.add_argument("--calib-ann", type=Path, help="COCO annotation file: calibrate on its images in annotation "
                   "order, as the reference does")
    p.add_argument("--calib-img-dir", type=Path, help="image folder of --calib-ann")
    p.add_argument("--calib-images", type=positive_int, default=DEFAULT_CALIB_IMAGES, help="number of calibration "
                   f"images (default {DEFAULT_CALIB_IMAGES}), spread evenly over the folder or annotation file from "
                   "its first image on; 1 is the reference's setting (its first image). Every quantizer calibrates "
                   "on all of them (one forward per image, in lockstep: memory grows with N)")
    p.add_argument("--holdout", type=non_negative_int, default=DEFAULT_HOLDOUT, help="images of the same folder or "
                   "annotation file, not used to calibrate, on which the calibration check also compares the "
                   f"quantized model with float (default {DEFAULT_HOLDOUT}; 0: the calibration images only)")
    p.add_argument("--accept-accuracy-loss", action="store_true", help="write the artifact even when the "
                   "calibration check fails (the quantized model lost more against float than the bound; the "
                   "figures are recorded in repq.json as calibration_check)")
    p.add_argument("--out", type=Path, help="artifact directory (default: repq-out/<ckpt name>-w<W>a<A>)")
    p.add_argument("--deploy-config", type=Path, help="deploy config (deploy_configs/*.py); default: "
                   "onnxruntime CPU, dynamic shapes, opset 17")
    p.add_argument("--device", type=device, default=default_device(), help="calibration device: cpu or cuda "
                   "(default: cuda where available)")
    p.add_argument("--engine", action="store_true", help="also build a TensorRT engine (needs tensorrt and a GPU)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    max_pixels_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_recon_options(p)
    return p


def run_export(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    w_bits, a_bits = args.w_bits or args.bits, args.a_bits or args.bits
    if w_bits is None or a_bits is None:
        raise UserError("--bits (or both --w-bits and --a-bits) is required")
    from .deploy_config import load_deploy_config
    from .export.artifact import ExportRequest, check_export_out, export_artifact
    from .artifact.artifact_file import Artifact, engine_beside
    from .export.forms import check_export_bits, form_for
    from .export.tensorrt_builder import build_engine, tensorrt_available
    from .files import check_input_file
    from .output_dir import record_added_file
    from .resources import DEFAULT_DEPLOY_CONFIG, MAX_ANNOTATION_BYTES, MAX_CONFIG_BYTES

    check_input_file(args.ckpt, "checkpoint", "--ckpt")
    if args.config is not None:
        check_input_file(args.config, "config", "--config", MAX_CONFIG_BYTES)
    if args.calib_ann is not None:
        check_input_file(args.calib_ann, "annotation", "--calib-ann", MAX_ANNOTATION_BYTES)
    deploy = load_deploy_config(args.deploy_config or DEFAULT_DEPLOY_CONFIG)
    check_export_bits(w_bits, a_bits, form_for(deploy), "--w-bits" if args.w_bits else "--bits",
                      "--a-bits" if args.a_bits else "--bits")
    if args.engine:
        ok, why = tensorrt_available()
        if not ok:
            raise UserError(f"--engine: {why}; nothing was written (leave out --engine for the ONNX artifact)")
    out = args.out or Path("repq-out") / f"{args.ckpt.stem}-w{w_bits}a{a_bits}"
    req = ExportRequest(ckpt=args.ckpt, out=out, w_bits=w_bits, a_bits=a_bits, config=args.config,
                        calib_dir=args.calib, calib_ann=args.calib_ann, calib_img_dir=args.calib_img_dir,
                        calib_images=args.calib_images, holdout=args.holdout,
                        accept_accuracy_loss=args.accept_accuracy_loss, deploy_config=args.deploy_config,
                        device=args.device, force=args.force, make_parent=args.out is None,
                        max_pixels=args.max_pixels, recon=recon_settings(args))
    check_export_out(req)
    artifact = Artifact.open(export_artifact(req, progress=not args.quiet))
    print(f"wrote {artifact.onnx_path}, quant.pth, repq.json")
    if args.engine:
        engine = engine_beside(artifact.onnx_path)
        build_engine(artifact.onnx_path, engine, deploy)
        record_added_file(artifact.path, engine)
        print(f"wrote {engine}")
    return 0


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
    from .artifact.artifact_file import onnx_file_of
    from .deploy_config import TARGET_ANY, TARGET_VNNI
    from .export.forms import ONNXRUNTIME, graph_form
    from .graph_targets import graph_target_cpu
    from .export.ort_check import check_onnxruntime_form, format_ort_report
    from .export.trt_check import check_tensorrt_compat, format_report

    path = onnx_file_of(args.model) if args.model.is_dir() else args.model
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    proto = read_onnx(path)
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
            TARGET_ANY: " (int8 weight codes within +-64: exact on every CPU)",
            TARGET_VNNI: " (8-bit weights as full-range int8: exact only on x86 CPUs with AVX-512 VNNI, "
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
    from .export.graph_index import Issue

    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        return []
    return [Issue("(graph)", "-", "not-quantized", "no QuantizeLinear/DequantizeLinear node: a float graph, "
                  "not a quantized (QDQ) model")]


def unknown_command(word: str) -> UserError:
    """The error for a first word that is neither a command nor an option (a typo such as 'chek')."""
    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"the commands are {', '.join(SUBCOMMANDS)}"
    return UserError(f"unknown command '{word}': {hint} (see repq-export --help)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `repq-export` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        word = argv[0]

        def refuse() -> int:
            raise unknown_command(word)
        return run_command(refuse)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "export"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    if command == "demo":
        from .commands.demo import run_demo as body
    elif command == "predict":
        from .commands.predict import run_predict as body
    elif command in ("serve", "infer", "triton-repo"):
        from .commands import serving

        body = {"serve": serving.run_serve, "infer": serving.run_infer, "triton-repo": serving.run_triton_repo}[command]
    elif command == "check":
        body = run_check
    else:
        body = run_export
    return run_command(lambda: body(rest))


if __name__ == "__main__":
    sys.exit(main())
