"""`tools/test.py CONFIG CKPT --eval bbox segm [--w_bits N --a_bits N]`: COCO AP of any stage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.calibration_choice import spread_indices
from ..data.coco import CocoDataset
from ..data.images import blame_calibration_images, read_image
from ..data.transforms import preprocess
from ..errors import UserError
from ..files import check_input_file, write_atomically
from ..artifact.artifact_file import Artifact
from ..resources import MAX_ANNOTATION_BYTES, MAX_CONFIG_BYTES
from ..evaluation.coco_eval import format_ap_table
from ..evaluation import distributed
from ..evaluation.evaluate import coco_results, score_run
from ..evaluation.image_loop import run_dataset, run_sharded
from ..models.checkpoint import load_checkpoint
from ..output_dir import check_not_an_input
from .common import (CommandParser, bits, default_device, device, max_pixels_option, output_file, positive_int,
                     run_command)
from .recon_options import add_recon_options, maybe_reconstruct, recon_settings
from ..runtime.build import BACKENDS, RunnerSettings, runner_for

DEFAULT_ANN = Path("data/coco/annotations/instances_val2017.json")
DEFAULT_IMG_DIR = Path("data/coco/val2017")


def parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="tools/test.py", description="Evaluate COCO box and mask AP of a Swin Mask R-CNN / Cascade Mask "
        "R-CNN checkpoint, in float, as RepQ-ViT fake quant (--w_bits/--a_bits), or as an exported graph in "
        "onnxruntime or TensorRT (--backend ort|trt --model PATH). The reference's interface. Under torchrun (torchrun "
        "--nproc-per-node N tools/test.py ...) rank 0 calibrates, each process runs a share of the images and rank 0 "
        "scores them all: the same metrics as one process.")
    p.add_argument("config", type=Path, help="model config (configs/swin/...)")
    p.add_argument("checkpoint", type=Path, help="checkpoint (.pth)")
    p.add_argument("--eval", nargs="+", choices=("bbox", "segm"), default=["bbox", "segm"],
                   help="metrics (default: bbox segm)")
    p.add_argument("--w_bits", "--w_bit", "--w-bits", dest="w_bits", type=bits, help="weight bits (2..8): "
                   "evaluate fake quant")
    p.add_argument("--a_bits", "--a_bit", "--a-bits", dest="a_bits", type=bits, help="activation bits (2..8)")
    p.add_argument("--calib-images", type=positive_int, default=1, help="calibration images (default 1: the first "
                   "of the dataset in loader order, as the reference; with more, they are spread evenly over the "
                   "dataset from the first on, and every quantizer calibrates on all of them)")
    p.add_argument("--save-quant", type=Path, help="save the calibrated quantization state to this file")
    p.add_argument("--load-quant", type=Path, help="load a saved quantization state instead of calibrating")
    ref = p.add_argument_group("the reference's behaviour, to measure each of our departures (fake quant only; "
                               "such a model cannot be exported exactly)")
    ref.add_argument("--fractional-zero-point", action="store_true", help="keep the reparameterized zero point "
                     "fractional (mean of the per-channel ones), as the reference")
    ref.add_argument("--zero-padding", action="store_true", help="pad windows with zeros after a reparameterized "
                     "LayerNorm, as the reference (not output-preserving)")
    ref.add_argument("--float-bias", action="store_true", help="keep biases off the int32 grid")
    ref.add_argument("--float-bn", action="store_true", help="keep BatchNorm in float after the quantized convs")
    ref.add_argument("--no-reparam", action="store_true", help="skip the scale reparameterization")
    p.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto",
                   help="torch (float), quant (fake quant), ort (onnxruntime), trt (TensorRT), openvino (OpenVINO "
                   "CPU, f32 unless the artifact's deploy config recorded otherwise); auto = quant "
                   "when bits or --load-quant are given, else torch")
    p.add_argument("--model", type=Path, help="ONNX file, engine or artifact directory for --backend "
                   "ort|trt|openvino")
    p.add_argument("--ann", type=Path, default=DEFAULT_ANN, help=f"COCO annotation file (default {DEFAULT_ANN})")
    p.add_argument("--img-dir", type=Path, default=DEFAULT_IMG_DIR, help=f"image folder (default {DEFAULT_IMG_DIR})")
    p.add_argument("--max-images", type=positive_int, help="evaluate only the first N images")
    p.add_argument("--device", type=device, default=default_device(), help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", type=Path, help="write the COCO-format detections (bbox and segm) to this JSON file")
    p.add_argument("--json-out", type=Path, help="write the metrics (bbox_mAP, segm_mAP, ... as fractions) to "
                   "this JSON file")
    max_pixels_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_recon_options(p)
    return p


def write_json(path: Path, data) -> None:
    """Write JSON through a temporary name."""
    write_atomically(path, json.dumps(data, indent=1) + "\n")


def quantized_model(args, detector, dataset, settings):
    """Fake-quant detector: loaded from --load-quant, or calibrated on the first dataset images."""
    from ..quant.calibrate import quantize
    from ..quant.state import load_quant_state, save_quant_state

    if args.load_quant:
        return load_quant_state(detector, args.load_quant, args.w_bits, args.a_bits)
    w_bits, a_bits = args.w_bits or 4, args.a_bits or 4  # the reference's defaults
    paths = [dataset[i][1] for i in spread_indices(len(dataset), args.calib_images)]
    preps = [preprocess(read_image(p, args.max_pixels), **vars(settings)) for p in paths]
    try:
        qmodel = quantize(detector.to(args.device), [(p.tensor.to(args.device), p.img_hw_tensor.to(args.device))
                                                     for p in preps], w_bits, a_bits, reparam=not args.no_reparam,
                          integer_zero_point=not args.fractional_zero_point, exact_padding=not args.zero_padding,
                          progress=not args.quiet, integer_bias=not args.float_bias, fold_bn=not args.float_bn)
    except UserError as exc:
        raise blame_calibration_images(exc, paths) from None
    maybe_reconstruct(qmodel, [(p.tensor.to(args.device), p.img_hw_tensor.to(args.device)) for p in preps],
                      recon_settings(args), progress=not args.quiet)
    if args.save_quant:
        save_quant_state(qmodel.cpu(), args.save_quant, paths, args.checkpoint)
        print(f"saved quantization state to {args.save_quant}")
    return qmodel


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that cannot be written or would overwrite an input or each other."""
    outputs = {"--out": args.out, "--json-out": args.json_out, "--save-quant": args.save_quant}
    for option, path in outputs.items():
        output_file(path, option)
    check_not_an_input(outputs, {"CONFIG": args.config, "CHECKPOINT": args.checkpoint, "--ann": args.ann,
                                 "--img-dir": args.img_dir, "--load-quant": args.load_quant, "--model": args.model})


def check_quant_source(quant_file: Path, checkpoint: Path, checkpoint_sha256: str) -> None:
    """Refuse a quant file calibrated from another checkpoint: it carries its own weights, so loading it
    would silently evaluate that other model under CHECKPOINT's name."""
    from ..quant.state import read_quant_state

    source = read_quant_state(quant_file)[0].get("source_checkpoint_sha256")
    if source is not None and source != checkpoint_sha256:
        raise UserError(f"{quant_file}: calibrated from another checkpoint (sha256 {source[:12]}...), not "
                        f"{checkpoint} (sha256 {checkpoint_sha256[:12]}...)")


def check_model_source(model: Path, artifact: Artifact | None, checkpoint: Path, checkpoint_sha256: str) -> None:
    """Refuse an artifact (or its graph or engine) exported from another checkpoint: its AP would be
    reported under CHECKPOINT's name. A graph from elsewhere (no manifest) records no source."""
    if artifact is None:
        return
    if artifact.source_sha256 != checkpoint_sha256:
        raise UserError(f"--model {model}: exported from another checkpoint ({artifact.source_name}, sha256 "
                        f"{artifact.source_sha256[:12]}...), not {checkpoint} (sha256 {checkpoint_sha256[:12]}...); give "
                        "the checkpoint it was made from")


def run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    backend = args.backend
    if backend == "auto":
        backend = "quant" if (args.w_bits or args.a_bits or args.load_quant) else "torch"
    for flag, path in (("--ann", args.ann), ("--img-dir", args.img_dir)):
        if not path.exists():
            raise UserError(f"{flag} {path}: not found")
    check_input_file(args.config, "config", None, MAX_CONFIG_BYTES)
    check_input_file(args.ann, "annotation", "--ann", MAX_ANNOTATION_BYTES)
    check_outputs(args)
    group = distributed.init_from_env(args.device)
    try:
        return evaluate(args, backend, group)
    finally:
        distributed.close(group)


def evaluate(args, backend: str, group: distributed.ProcessGroup | None) -> int:
    """Evaluate in this process, or as one rank of a torchrun job (rank 0 reports)."""
    dataset = CocoDataset(args.ann, args.img_dir, tuple(args.eval))  # first: a bad file costs no model work
    recorded = Artifact.describing(args.model) if backend in ("ort", "trt") and args.model is not None else None
    detector, info = load_checkpoint(args.checkpoint, args.config)
    check_model_source(args.model, recorded, args.checkpoint, info.sha256)
    if len(dataset.cat_ids) != info.arch.num_classes:
        raise UserError(f"{args.ann}: {len(dataset.cat_ids)} categories, but the model predicts "
                        f"{info.arch.num_classes} classes")
    if backend == "quant":
        def make():
            if args.load_quant:
                check_quant_source(args.load_quant, args.checkpoint, info.sha256)
            return quantized_model(args, detector, dataset, info.preprocess)

        model = distributed.shared_quant_model(make, detector, group)
    else:
        model = detector
    device = args.device  # TensorRT takes the GPU init_from_env made current; onnxruntime's CUDA provider GPU 0
    if group and args.device == "cuda" and backend in ("torch", "quant"):
        device = f"cuda:{group.local_rank}"
    source = model if backend in ("torch", "quant") else (recorded if recorded is not None and args.model.is_dir()
                                                         else args.model)
    runner = runner_for(backend, source, RunnerSettings(device=device))
    if group is None:
        run_ = run_dataset(runner, dataset, info.preprocess, args.max_images, progress=not args.quiet,
                           max_pixels=args.max_pixels, slim=True)
    else:
        run_ = run_sharded(runner, dataset, info.preprocess, args.max_images, group, max_pixels=args.max_pixels)
        if run_ is None:
            return 0
    metrics = score_run(run_, dataset, tuple(args.eval))
    for metric in args.eval:
        print(f"\nEvaluating {metric}...\n" + format_ap_table(metrics, metric))
    summary = "  ".join(f"{m}_mAP: {metrics[f'{m}_mAP']:.4f}" for m in args.eval)
    where = f" ({group.world_size} processes)" if group else ""
    print(f"{backend} on {len(run_.images)} images{where}: {summary}")
    if args.out:
        bbox, segm = coco_results(run_, dataset)
        write_json(args.out, {"bbox": bbox, "segm": segm})
    if args.json_out:
        write_json(args.json_out, {"backend": backend, "images": len(run_.images), **metrics})
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(argv))
