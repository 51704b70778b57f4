"""`repq-export predict ARTIFACT IMAGE --save out.png`: run an exported artifact on one image and draw
what it finds (boxes, class labels with scores, translucent masks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.images import read_image
from ..data.postprocess import postprocess
from ..data.transforms import preprocess
from ..errors import UserError
from ..evaluation.visualize import IMAGE_SUFFIXES, class_name, draw_detections, write_image
from ..artifact.artifact_file import Artifact
from ..artifact.detector import fake_quant_model
from ..output_dir import check_not_an_input, check_output_file
from .common import CommandParser, fraction, max_pixels_option
from ..runtime.build import RunnerSettings, runner_for

MAX_LISTED = 20  # detections printed one a line; the picture shows them all


def parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="repq-export predict", description="Run an artifact written by repq-export on one image and save a "
        "picture of its detections: boxes, class labels with scores and translucent masks.")
    p.add_argument("artifact", type=Path, help="artifact directory (model.onnx, quant.pth, repq.json)")
    p.add_argument("image", type=Path, help="image file (any format OpenCV reads)")
    p.add_argument("--save", type=Path, help="picture to write, .png or .jpg (default: <image name>_pred.png in "
                   "the current folder)")
    p.add_argument("--backend", choices=("ort", "quant", "trt", "openvino"), default="ort", help="ort: the ONNX "
                   "graph in onnxruntime (default); quant: the fake-quant PyTorch model; trt: the artifact's TensorRT "
                   "engine; openvino: the ONNX graph in OpenVINO on CPU (f32 unless the deploy config says bf16)")
    p.add_argument("--score-thr", type=fraction, default=0.3, help="draw detections scoring at least this "
                   "(default 0.3)")
    max_pixels_option(p)
    return p


def save_path(args: argparse.Namespace) -> Path:
    """Where the picture goes; checked before any model is loaded, so a typo costs nothing."""
    path = args.save or Path(f"{args.image.stem}_pred.png")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--save {path}: give a file name ending in {', '.join(IMAGE_SUFFIXES)}")
    check_output_file(path, "--save")
    check_not_an_input({"--save": path}, {"IMAGE": args.image, "ARTIFACT": getattr(args, "artifact", None)})
    return path


def run_predict(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    out = save_path(args)
    img = read_image(args.image, args.max_pixels)
    artifact = Artifact.open(args.artifact)
    source = fake_quant_model(artifact) if args.backend == "quant" else artifact
    runner = runner_for(args.backend, source, RunnerSettings(device="cuda" if args.backend == "trt" else "cpu"))
    try:
        prep = preprocess(img, **vars(artifact.preprocess))
    except UserError as exc:
        raise UserError(f"{args.image}: {exc}") from None
    mask_thr = artifact.post_processing.mask_thr_binary
    dets = postprocess(*runner(prep.tensor, prep.img_hw_tensor), prep, mask_thr=mask_thr, keep_binary=True)
    classes = artifact.classes
    write_image(out, draw_detections(img, dets, classes, args.score_thr))
    shown = [i for i in dets.scores.argsort(kind="stable")[::-1] if dets.scores[i] >= args.score_thr]
    print(f"wrote {out}: {len(shown)} detections with score >= {args.score_thr:g} ({len(dets)} in all), "
          f"{args.backend} backend, {artifact.precision}")
    for i in shown[:MAX_LISTED]:
        box = ", ".join(f"{v:.1f}" for v in dets.boxes[i])
        print(f"  {class_name(int(dets.labels[i]), classes):<16} {dets.scores[i]:.3f}  [{box}]")
    if len(shown) > MAX_LISTED:
        print(f"  ... and {len(shown) - MAX_LISTED} more")
    return 0
