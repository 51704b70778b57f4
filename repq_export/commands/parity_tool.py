"""`tools/parity_check.py ARTIFACT --ann FILE --img-dir DIR`: does the backend compute fake quant?"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.coco import CocoDataset
from ..errors import UserError
from ..evaluation.parity_check import check_parity
from ..export.artifact import load_artifact_model
from .common import default_device, device, positive_int, run_command
from .runners import make_runner, model_file
from .test_tool import write_json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/parity_check.py", description="Run the artifact's fake-quant model and a backend on the same "
        "images and report three tiers: integer codes of every quantizer (onnxruntime), matched detections, and "
        "COCO box/mask AP (|delta| <= 0.1 AP points). Exit 0 when all pass, 1 otherwise.")
    p.add_argument("artifact", type=Path, help="artifact directory written by repq-export")
    p.add_argument("--ann", type=Path, required=True, help="COCO annotation file")
    p.add_argument("--img-dir", type=Path, required=True, help="image folder")
    p.add_argument("--max-images", type=positive_int, help="only the first N images")
    p.add_argument("--backend", choices=("ort", "trt"), default="ort", help="onnxruntime (default) or TensorRT")
    p.add_argument("--code-images", type=int, default=1, help="images for the tier-1 code probe (default 1; "
                   "0 skips it)")
    p.add_argument("--device", type=device, default="cpu", help="device of the fake-quant model (default cpu)")
    p.add_argument("--json-out", type=Path, help="write the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    for flag, path in (("--ann", args.ann), ("--img-dir", args.img_dir)):
        if not path.exists():
            raise UserError(f"{flag} {path}: not found")
    qmodel, manifest, settings = load_artifact_model(args.artifact)
    dataset = CocoDataset(args.ann, args.img_dir)
    ref = make_runner("quant", qmodel, device=args.device)
    backend = make_runner(args.backend, model_path=args.artifact, device="cuda" if args.backend == "trt" else "cpu")
    onnx_path = str(model_file(args.artifact, "ort")) if args.backend == "ort" else None
    report, _, _ = check_parity(qmodel, ref, backend, dataset, settings, args.max_images, onnx_path,
                                args.code_images, progress=not args.quiet)
    print(report.table())
    if args.json_out:
        write_json(args.json_out, report.as_dict())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(argv))
