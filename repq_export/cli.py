"""`repq-export`: checkpoint -> calibrated RepQ-ViT -> exact QDQ ONNX (+ TensorRT engine).

    repq-export --ckpt model.pth --bits 4 --calib images/      export an artifact directory
    repq-export check model.onnx                               TensorRT rules, no TensorRT needed
    repq-export demo                                           the whole pipeline on the bundled models
    repq-export predict ARTIFACT IMAGE --save out.png          draw detections
    repq-export serve ARTIFACT / infer URL IMAGE / triton-repo ARTIFACT OUT   serving ([serve] extra)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .commands.common import CommandParser, bits, default_device, device, positive_int, run_command
from .errors import UserError

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
    p.add_argument("--bits", type=bits, help="weight and activation bits (2..7 exportable; 8 only in fake quant)")
    p.add_argument("--w-bits", "--w_bits", dest="w_bits", type=bits, help="weight bits (overrides --bits)")
    p.add_argument("--a-bits", "--a_bits", dest="a_bits", type=bits, help="activation bits (overrides --bits)")
    p.add_argument("--calib", type=Path, help="folder of calibration images (taken sorted by name)")
    p.add_argument("--calib-ann", type=Path, help="COCO annotation file: calibrate on its images in annotation "
                   "order, as the reference does")
    p.add_argument("--calib-img-dir", type=Path, help="image folder of --calib-ann")
    p.add_argument("--calib-images", type=positive_int, default=1, help="number of calibration images "
                   "(default 1, the reference's setting); with more, every quantizer calibrates on all of them "
                   "(one forward per image, in lockstep: memory grows with N)")
    p.add_argument("--out", type=Path, help="artifact directory (default: repq-out/<ckpt name>-w<W>a<A>)")
    p.add_argument("--deploy-config", type=Path, help="deploy config (deploy_configs/*.py); default: "
                   "onnxruntime CPU, dynamic shapes, opset 17")
    p.add_argument("--device", type=device, default=default_device(), help="calibration device: cpu or cuda "
                   "(default: cuda where available)")
    p.add_argument("--engine", action="store_true", help="also build a TensorRT engine (needs tensorrt and a GPU)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run_export(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    w_bits, a_bits = args.w_bits or args.bits, args.a_bits or args.bits
    if w_bits is None or a_bits is None:
        raise UserError("--bits (or both --w-bits and --a-bits) is required")
    from .export.artifact import ExportRequest, export_artifact

    out = args.out or Path("repq-out") / f"{args.ckpt.stem}-w{w_bits}a{a_bits}"
    req = ExportRequest(ckpt=args.ckpt, out=out, w_bits=w_bits, a_bits=a_bits, config=args.config,
                        calib_dir=args.calib, calib_ann=args.calib_ann, calib_img_dir=args.calib_img_dir,
                        calib_images=args.calib_images, deploy_config=args.deploy_config, device=args.device,
                        force=args.force, make_parent=args.out is None)
    if not args.ckpt.is_file():
        raise UserError(f"{args.ckpt}: checkpoint not found")
    artifact = export_artifact(req, progress=not args.quiet)
    print(f"wrote {artifact}/model.onnx, quant.pth, repq.json")
    if args.engine:
        from .export.tensorrt_builder import build_engine, tensorrt_available
        from .deploy_config import load_deploy_config
        from .export.artifact import DEFAULT_DEPLOY

        ok, why = tensorrt_available()
        if not ok:
            raise UserError(f"--engine: {why}; the ONNX artifact was written to {artifact}")
        build_engine(artifact / "model.onnx", artifact / "model.engine",
                     load_deploy_config(args.deploy_config or DEFAULT_DEPLOY))
        print(f"wrote {artifact}/model.engine")
    return 0


def run_check(argv: list[str]) -> int:
    p = CommandParser(prog="repq-export check", description="Report every node of an ONNX graph that "
                      "breaks TensorRT's documented rules for explicit quantization (zero points, "
                      "per-channel activations, Q/DQ types and placement, unsupported ops). Exit 1 if "
                      "any error is found. Needs no TensorRT.")
    p.add_argument("model", type=Path, help="ONNX file (or an artifact directory)")
    args = p.parse_args(argv)
    import onnx

    from .export.trt_check import check_tensorrt_compat, format_report

    path = args.model / "model.onnx" if args.model.is_dir() else args.model
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UserError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    issues = check_tensorrt_compat(proto)
    print(format_report(issues))
    return 1 if any(i.severity == "error" for i in issues) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `repq-export` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
