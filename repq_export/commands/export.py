"""`repq-export [export]`: checkpoint -> calibrated RepQ-ViT -> artifact directory (+ TensorRT engine)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .common import CommandParser, bits, default_device, device, max_pixels_option, non_negative_int, positive_int
from .recon_options import add_recon_options, recon_settings

# Several images spread over the set: one image can misfit the rest (tools/diagnose_calibration.py). Eight
# keep the lockstep calibration's memory (eight forwards alive at once) within a few GB at full size.
DEFAULT_CALIB_IMAGES = 8
# Held-out images for the calibration check: a calibration fits its own images best, so misfits show on others.
DEFAULT_HOLDOUT = 8


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
    p.add_argument("--bits", type=bits, help="weight and activation bits (2..8 with an onnxruntime or OpenVINO deploy "
                   "config; 2..7 with a TensorRT one)")
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
    from ..artifact.artifact_file import Artifact, engine_beside
    from ..export.artifact import ExportRequest, check_export, write_artifact
    from ..export.tensorrt_builder import build_engine
    from ..files import check_input_file
    from ..artifact.folder import record_added_file
    from ..resources import MAX_ANNOTATION_BYTES, MAX_CONFIG_BYTES

    check_input_file(args.ckpt, "checkpoint", "--ckpt")
    if args.config is not None:
        check_input_file(args.config, "config", "--config", MAX_CONFIG_BYTES)
    if args.calib_ann is not None:
        check_input_file(args.calib_ann, "annotation", "--calib-ann", MAX_ANNOTATION_BYTES)
    out = args.out or Path("repq-out") / f"{args.ckpt.stem}-w{w_bits}a{a_bits}"
    req = ExportRequest(ckpt=args.ckpt, out=out, w_bits=w_bits, a_bits=a_bits, config=args.config,
                        calib_dir=args.calib, calib_ann=args.calib_ann, calib_img_dir=args.calib_img_dir,
                        calib_images=args.calib_images, holdout=args.holdout,
                        accept_accuracy_loss=args.accept_accuracy_loss, deploy_config=args.deploy_config,
                        device=args.device, force=args.force, make_parent=args.out is None,
                        max_pixels=args.max_pixels, recon=recon_settings(args), engine=args.engine,
                        bits_options=("--w-bits" if args.w_bits else "--bits", "--a-bits" if args.a_bits else "--bits"))
    job = check_export(req)
    artifact = Artifact.open(write_artifact(job, progress=not args.quiet))
    print(f"wrote {artifact.onnx_path}, quant.pth, repq.json")
    if args.engine:
        engine = engine_beside(artifact.onnx_path)
        build_engine(artifact.onnx_path, engine, job.deploy)
        record_added_file(artifact.path, engine)
        print(f"wrote {engine}")
    return 0
