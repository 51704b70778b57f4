"""`tools/parity_check.py ARTIFACT --ann FILE --img-dir DIR`: does the backend compute fake quant?"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch
from torch import nn

from ..data.coco import CocoDataset
from ..data.images import read_image
from ..errors import UserError
from ..evaluation.envelope import AP_MARGIN, MATCH_MARGIN, RULE, SAMPLES, Float64Reference
from ..evaluation.image_loop import DatasetRun
from ..evaluation.layer_errors import attach_code_mismatches, measure_layer_errors
from ..evaluation.noise_floor import Ulps, measure_noise_floor
from ..evaluation.parity_check import AP_TOLERANCE, MATCH_RATE_MIN, ParityOptions, ParityReport, check_parity
from ..evaluation.visualize import plot_layer_errors, side_by_side, write_image
from ..artifact.artifact_file import Artifact
from ..artifact.detector import fake_quant_model
from ..output_dir import check_not_an_input
from ..runtime.base import Runner
from ..runtime.build import ONNX_BACKENDS, RunnerSettings, runner_for
from .common import CommandParser, device, fraction, non_negative_int, output_file, positive_int, run_command
from .test_tool import write_json


def parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="tools/parity_check.py", description="Run the artifact's fake-quant model and a backend on the same "
        "images and report three tiers: integer codes of every quantizer (onnxruntime), matched detections, and "
        "COCO box/mask AP. Tiers 2 and 3 are judged against the same fake-quant model run in float64 (ideal "
        f"arithmetic on the same quantization grid): {RULE} Exit 0 when all pass, 1 otherwise.")
    p.add_argument("artifact", type=Path, help="artifact directory written by repq-export")
    p.add_argument("--ann", type=Path, required=True, help="COCO annotation file")
    p.add_argument("--img-dir", type=Path, required=True, help="image folder")
    p.add_argument("--max-images", type=positive_int, help="only the first N images")
    p.add_argument("--backend", choices=("ort", "trt", "openvino", "quant-cuda"), default="ort", help="onnxruntime "
                   "(default), TensorRT, OpenVINO on CPU (tier 1 reported as near-tie flips, not judged; tiers 2 and 3 "
                   "by the float64 rule), or the fake-quant model itself on CUDA (against itself on --device)")
    p.add_argument("--ov-precision", choices=("f32", "bf16"), help="OpenVINO's inference precision (default: "
                   "the artifact's deploy config, else f32); always set explicitly, since OpenVINO's own default "
                   "is bf16 on CPUs with BF16/AMX")
    p.add_argument("--code-images", type=non_negative_int, default=1, help="images for the tier-1 code probe (default 1; "
                   "0 skips it)")
    p.add_argument("--match-margin", type=fraction, default=MATCH_MARGIN, help="tier 2 margin: how many fewer "
                   f"detections (a fraction) matched with float64 than torch float32 matches are tolerated (default "
                   f"{MATCH_MARGIN})")
    p.add_argument("--ap-margin", type=fraction, default=AP_MARGIN, help="tier 3 margin: how much further from "
                   f"float64's AP than torch float32's (a fraction of AP) is tolerated (default {AP_MARGIN} = "
                   f"{100 * AP_MARGIN:g} AP points)")
    p.add_argument("--bootstrap-samples", type=positive_int, default=SAMPLES, help="resamples of the images for "
                   f"the 95%% intervals (default {SAMPLES})")
    p.add_argument("--no-float64", action="store_true", help="skip the float64 run (about 2.5x the time of fake "
                   "quant); tiers 2 and 3 then use the fixed tolerances")
    p.add_argument("--ap-tolerance", type=fraction, help="tier 3 by a fixed tolerance instead: largest |AP delta| "
                   "against torch fake quant, as a fraction (without the float64 run: 0.001)")
    p.add_argument("--min-match-rate", type=fraction, help="tier 2 by a fixed tolerance instead: smallest share of "
                   "detections matched one to one with torch fake quant (same label, IoU >= 0.5; without the "
                   "float64 run: 0.99)")
    p.add_argument("--device", type=device, default="cpu", help="device of the fake-quant model (default cpu)")
    p.add_argument("--json-out", type=Path, help="write the report as JSON")
    p.add_argument("--save-images", type=Path, metavar="DIR", help="write, per image, the fake-quant and backend "
                   "detections side by side (DIR/<image name>.png; DIR is created)")
    p.add_argument("--save-plot", type=Path, metavar="FILE", help="write a PNG bar plot of each quantizer's "
                   "relative error ||q(x) - x|| / ||x|| on the first image, layers whose tier-1 codes differ marked")
    p.add_argument("--score-thr", type=fraction, default=0.3, help="score threshold of the --save-images pictures "
                   "(default 0.3)")
    p.add_argument("--noise-floor", type=positive_int, nargs="?", const=1, metavar="SAMPLES",
                   help="also rerun fake quant SAMPLES times (default 1) with every activation quantizer's input "
                   "moved by float32 ulps (--noise-ulps; sample 1 all up, 2 all down, later ones each value up or "
                   "down at random) and report how far its detections and AP move, and whether the backend's tier-2/3 "
                   "figures lie within that range: the floor below which differences are float rounding (does "
                   "not change the verdict)")
    p.add_argument("--noise-ulps", type=ulps_option, default=1.0, metavar="K", help="move each input by K ulps "
                   "on average instead of 1 (fractions: some values one ulp more); 'auto': each quantizer by the "
                   "backend's own float difference there (the 'float parts' line, measured with both runs fed the "
                   "backend's codes on the tier-1 images; unmeasured quantizers take the mean)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    for flag, path in (("--ann", args.ann), ("--img-dir", args.img_dir)):
        if not path.exists():
            raise UserError(f"{flag} {path}: not found")
    check_picture_paths(args)
    output_file(args.json_out, "--json-out")
    check_not_an_input({"--json-out": args.json_out, "--save-plot": args.save_plot, "--save-images": args.save_images},
                       {"ARTIFACT": args.artifact, "--ann": args.ann, "--img-dir": args.img_dir})
    dataset = CocoDataset(args.ann, args.img_dir)  # first: a bad file costs no model work
    artifact = Artifact.open(args.artifact)
    qmodel = fake_quant_model(artifact)
    settings = artifact.preprocess
    num_classes = artifact.num_classes
    if num_classes is not None and len(dataset.cat_ids) != num_classes:
        raise UserError(f"{args.ann}: {len(dataset.cat_ids)} categories, but the model predicts "
                        f"{num_classes} classes")
    ref = runner_for("quant", qmodel, RunnerSettings(device=args.device))
    backend = make_backend(args, artifact, qmodel)
    ideal = None if args.no_float64 else Float64Reference(qmodel)
    onnx_path = artifact.onnx_path if args.backend in ONNX_BACKENDS else None
    options = ParityOptions(max_images=args.max_images, code_images=args.code_images, progress=not args.quiet,
                            ap_tolerance=args.ap_tolerance, min_match_rate=args.min_match_rate,
                            match_margin=args.match_margin, ap_margin=args.ap_margin, samples=args.bootstrap_samples)
    report, ref_run, backend_run = check_parity(qmodel, ref, backend, dataset, settings, options, onnx_path, ideal)
    print(report.table())
    result = report.as_dict()
    if args.noise_floor:
        floor = measure_noise_floor(qmodel, ref, ref_run, dataset, settings, args.noise_floor,
                                    floor_ulps(args.noise_ulps, report), progress=not args.quiet)
        for sample in floor.samples:
            print(sample.line())
        inside = floor.contains(report.detections.match_rate, report.ap_delta("bbox"), report.ap_delta("segm"),
                                args.min_match_rate or MATCH_RATE_MIN, args.ap_tolerance or AP_TOLERANCE)
        print(f"{floor.summary()}; {args.backend} is {'within' if inside else 'outside'} it")
        result["noise_floor"] = {**floor.as_dict(), "backend_within": inside}
    if args.json_out:
        write_json(args.json_out, result)
    precision = artifact.precision
    if args.save_images:
        save_pictures(args.save_images, ref_run, backend_run, artifact.classes,
                      (f"fake quant {precision}", args.backend), args.score_thr)
        print(f"wrote {len(ref_run.images)} side-by-side pictures to {args.save_images}/")
    if args.save_plot:
        first = ref_run.images[0].prep
        errors = measure_layer_errors(qmodel, [(first.tensor, first.img_hw_tensor)])
        attach_code_mismatches(errors, report.codes)
        plot_layer_errors(errors, args.save_plot, f"per-layer quantization error, {precision}, "
                          f"{ref_run.images[0].path.name}")
        print(f"wrote {args.save_plot}")
    return 0 if report.ok else 1


def make_backend(args: argparse.Namespace, artifact: Artifact, qmodel: nn.Module) -> Runner:
    """The runner --backend names: onnxruntime or TensorRT on the artifact, or fake quant on CUDA."""
    if args.backend == "quant-cuda":
        if not torch.cuda.is_available():
            raise UserError("--backend quant-cuda: no CUDA device is available to torch")
        return runner_for("quant", copy.deepcopy(qmodel), RunnerSettings(device="cuda"))
    return runner_for(args.backend, artifact, RunnerSettings(device="cuda" if args.backend == "trt" else "cpu",
                                                              ov_precision=args.ov_precision))


def ulps_option(text: str) -> float | str:
    """--noise-ulps: a positive number or 'auto'."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of ulps or 'auto', got {text!r}")
    return value


def floor_ulps(option: float | str, report: ParityReport) -> Ulps:
    """The noise floor's step: as given, or for 'auto' each quantizer's measured float difference."""
    if option != "auto":
        return option
    steps = report.float_ulps_by_quantizer()
    if not steps:
        print("--noise-ulps auto: no float difference was measured (no tier-1 probe); using 1 ulp")
        return 1.0
    return steps


def check_picture_paths(args: argparse.Namespace) -> None:
    """Refuse picture destinations that cannot be written before the (long) check runs."""
    for flag, path in (("--save-images", args.save_images), ("--save-plot", args.save_plot)):
        if path is not None and not path.resolve().parent.is_dir():
            raise UserError(f"{flag} {path}: folder {path.resolve().parent} does not exist")
    if args.save_images is not None and args.save_images.exists() and not args.save_images.is_dir():
        raise UserError(f"--save-images {args.save_images}: exists and is not a directory")
    if args.save_plot is not None and args.save_plot.suffix.lower() != ".png":
        raise UserError(f"--save-plot {args.save_plot}: give a file name ending in .png")


def save_pictures(folder: Path, ref_run: DatasetRun, backend_run: DatasetRun, classes: tuple[str, ...] | None,
                  titles: tuple[str, str], score_thr: float) -> None:
    """One side-by-side picture an image: fake-quant detections left, the backend's right."""
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"--save-images {folder}: cannot create it ({exc.strerror or exc})") from None
    for ref, got in zip(ref_run.images, backend_run.images):
        picture = side_by_side(read_image(ref.path), ref.dets, got.dets, classes, titles, score_thr)
        write_image(folder / f"{ref.path.stem}.png", picture)


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(argv))
