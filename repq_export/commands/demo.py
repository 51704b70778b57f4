"""`repq-export demo`: the whole pipeline on the bundled detectors (or on yours), one table at the end.

    synthetic val set (cached) -> float AP -> per precision: calibrate, export, onnxruntime,
    parity (codes, detections, AP) -> TensorRT where it exists
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from ..data.calibration_choice import holdout_indices
from ..data.coco import CocoDataset
from ..data.synthetic import make_synthetic_set
from ..deploy_config import load_deploy_config
from ..errors import UserError
from ..evaluation.evaluate import score_run
from ..evaluation.image_loop import run_dataset
from ..evaluation.envelope import AP_MARGIN, MATCH_MARGIN, MIN_IMAGES, RULE, Float64Reference
from ..evaluation.parity_check import ParityOptions, ParityReport, check_parity
from ..artifact.artifact_file import Artifact, engine_beside
from ..artifact.detector import fake_quant_model
from ..export.artifact import ExportRequest, export_artifact
from ..models.checkpoint import load_checkpoint
from ..artifact.folder import ARTIFACT, record_added_file
from ..output_dir import check_not_an_input, check_replaceable
from ..resources import ASSETS_DIR, CONFIGS_DIR, DEPLOY_CONFIGS_DIR
from .common import CommandParser, bits, fraction, output_file, positive_int
from ..runtime.build import runner_for
from .test_tool import write_json

BUNDLED = (
    ("mask_rcnn_swin_synthetic", ASSETS_DIR / "mask_rcnn_swin_synthetic.pth",
     CONFIGS_DIR / "synthetic/mask_rcnn_swin_synthetic.py"),
    ("cascade_mask_rcnn_swin_synthetic", ASSETS_DIR / "cascade_mask_rcnn_swin_synthetic.pth",
     CONFIGS_DIR / "synthetic/cascade_mask_rcnn_swin_synthetic.py"),
)
DEMO_SEED = 2026  # the validation split's seed; the bundled detectors were trained on another
MAX_IMAGES = 5000  # COCO val2017's size; 40 take about 10 minutes, a synthetic image about 0.3 MB of disk


def image_count(text: str) -> int:
    """--num-images: 1..MAX_IMAGES."""
    value = positive_int(text)
    if value > MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_IMAGES} images (COCO val2017's size; 40 "
                                         "take about 10 minutes)")
    return value
HOLDOUT = 8  # images the calibration check compares float and fake quant on, besides the calibration image


@dataclass
class Row:
    """One line of the demo table."""

    model: str
    config: str
    checkpoint: str
    precision: str
    backend: str
    bbox_mAP: float | None  # None where the backend did not run
    segm_mAP: float | None
    parity: str
    parity_figures: dict | None = None  # the verdict's figures (see `parity_cell`)
    vs_float: str = "-"  # the calibration check's verdict and figures (fake-quant rows; see `check_cell`)
    calibration_check: dict | None = None  # repq.json's calibration_check block

    def cells(self) -> list[str]:
        def ap(v):
            return "-" if v is None else f"{100 * v:.1f}"
        return [self.model, self.precision, self.backend, ap(self.bbox_mAP), ap(self.segm_mAP), self.vs_float,
                self.parity]


def parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="repq-export demo", description="Run the whole pipeline and print one table: float, fake quant, "
        "onnxruntime (and TensorRT where available) box/mask AP, the calibration check (fake quant against float: "
        "matched detections and AP delta on the calibration image and held-out ones, judged against a bound; "
        "exact is not accurate) and the parity verdict: tier 1 integer codes, "
        f"tiers 2 and 3 against the fake-quant model run in float64 ({RULE}) With no arguments it "
        "uses the two bundled small Swin detectors on a synthetic validation set it generates (cached); with "
        "--ckpt/--config/--ann/--img-dir it runs the same on your model and COCO copy.")
    p.add_argument("--ckpt", type=Path, help="your checkpoint (default: the bundled detectors)")
    p.add_argument("--config", type=Path, help="config of --ckpt")
    p.add_argument("--ann", type=Path, help="COCO annotation file (default: the synthetic val set)")
    p.add_argument("--img-dir", type=Path, help="image folder of --ann")
    p.add_argument("--bits", type=bits, nargs="+", default=[6, 4], help="precisions WnAn to run (default 6 4)")
    p.add_argument("--num-images", type=image_count, default=40,
                   help="images evaluated (default 40, which keeps the demo under 10 minutes on 2 cores; "
                   f"the synthetic set is generated with this many; at most {MAX_IMAGES})")
    p.add_argument("--work-dir", type=Path, default=Path("repq-demo"), help="where the synthetic set and the "
                   "artifacts go (default ./repq-demo)")
    p.add_argument("--match-margin", type=fraction, default=MATCH_MARGIN, help="tier 2 margin, a fraction of "
                   f"detections (default {MATCH_MARGIN})")
    p.add_argument("--ap-margin", type=fraction, default=AP_MARGIN, help=f"tier 3 margin, a fraction of AP "
                   f"(default {AP_MARGIN})")
    p.add_argument("--json-out", type=Path, help="write the table rows as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def synthetic_set(work: Path, num_images: int) -> tuple[Path, Path]:
    """The cached synthetic validation split (made whole when missing, remade when incomplete)."""
    root = work / f"synthetic-val-{num_images}-seed{DEMO_SEED}"
    ann = make_synthetic_set(root, "val", num_images, DEMO_SEED,
                             log=lambda: print(f"generating {num_images} synthetic validation images in {root} ..."))
    return ann, root / "val"


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    head = ["model", "precision", "backend", "box AP", "mask AP", "accuracy vs float", "parity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def run_model(name: str, ckpt: Path, config: Path | None, ann: Path, img_dir: Path, args) -> list[Row]:
    """Float, then each precision's fake quant, onnxruntime and (where present) TensorRT rows."""
    from ..runtime.tensorrt_support import tensorrt_available

    dataset = CocoDataset(ann, img_dir)
    detector, info = load_checkpoint(ckpt, config)
    cfg_name = str(config) if config else "(from checkpoint)"
    rows = []
    float_run = run_dataset(runner_for("torch", detector), dataset, info.preprocess, args.num_images,
                            progress=not args.quiet)
    ap = score_run(float_run, dataset)
    rows.append(Row(name, cfg_name, str(ckpt), "float", "torch", ap["bbox_mAP"], ap["segm_mAP"], "-"))
    print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    trt_ok, trt_why = tensorrt_available()
    for n in args.bits:
        out = args.work_dir / f"{name}-w{n}a{n}"
        req = ExportRequest(ckpt=ckpt, out=out, w_bits=n, a_bits=n, config=config, calib_paths=[dataset[0][1]],
                            calib_ann=ann, calib_img_dir=img_dir, holdout=HOLDOUT,
                            holdout_paths=demo_holdout(dataset, args.num_images), accept_accuracy_loss=True,
                            force=True)
        export_artifact(req, progress=not args.quiet, log=lambda *_: None)
        artifact = Artifact.open(out)
        qmodel = fake_quant_model(artifact)
        check = artifact.calibration_check
        ref = runner_for("quant", qmodel)
        ort_runner = runner_for("ort", artifact)
        ideal = Float64Reference(qmodel)
        options = ParityOptions(max_images=args.num_images, progress=not args.quiet, match_margin=args.match_margin,
                                ap_margin=args.ap_margin, float_parts=False)
        report, _, _ = check_parity(qmodel, ref, ort_runner, dataset, artifact.preprocess, options, artifact.onnx_path,
                                    ideal)
        write_json(out / "parity_ort.json", report.as_dict())
        record_added_file(out, out / "parity_ort.json")
        precision = f"W{n}A{n}"
        rows.append(Row(name, cfg_name, str(ckpt), precision, "fake quant", report.ap_ref["bbox_mAP"],
                        report.ap_ref["segm_mAP"], "-", vs_float=check_cell(check), calibration_check=check))
        rows.append(Row(name, cfg_name, str(ckpt), precision, "onnxruntime", report.ap_backend["bbox_mAP"],
                        report.ap_backend["segm_mAP"], parity_cell(report), parity_figures(report)))
        print("\n".join(format_table(rows[-2:]).splitlines()[2:]), flush=True)
        rows.append(tensorrt_row(name, cfg_name, ckpt, config, n, dataset, args, trt_ok, ideal))
    return rows


def tensorrt_row(name: str, cfg_name: str, ckpt: Path, config: Path | None, n: int, dataset: CocoDataset,
                 args: argparse.Namespace, trt_ok: bool, ideal: Float64Reference) -> Row:
    """The TensorRT row of one precision: a TensorRT-form artifact, its engine and its parity, where
    TensorRT runs; 'skipped' (with why) elsewhere and at 8 bits, which the TensorRT form cannot carry."""
    from ..export.forms import TENSORRT, supported_bits
    from ..export.tensorrt_builder import build_engine

    precision = f"W{n}A{n}"
    if not trt_ok or n not in supported_bits(TENSORRT):
        return Row(name, cfg_name, str(ckpt), precision, "tensorrt", None, None,
                   "skipped" if not trt_ok else "skipped (8 bits: TensorRT form holds 2..7)")
    deploy_path = DEPLOY_CONFIGS_DIR / "instance-seg_tensorrt-int8_dynamic-320x320-1344x1344.py"
    out = args.work_dir / f"{name}-w{n}a{n}-tensorrt"
    export_artifact(ExportRequest(ckpt=ckpt, out=out, w_bits=n, a_bits=n, config=config, calib_paths=[dataset[0][1]],
                                  deploy_config=deploy_path, accept_accuracy_loss=True, force=True),
                    progress=not args.quiet, log=lambda *_: None)
    onnx_path = Artifact.open(out).onnx_path
    build_engine(onnx_path, engine_beside(onnx_path), load_deploy_config(deploy_path))
    record_added_file(out, engine_beside(onnx_path))
    artifact = Artifact.open(out)
    qmodel = fake_quant_model(artifact)
    options = ParityOptions(max_images=args.num_images, progress=not args.quiet, match_margin=args.match_margin,
                            ap_margin=args.ap_margin)
    report, _, _ = check_parity(qmodel, runner_for("quant", qmodel), runner_for("trt", artifact), dataset,
                                artifact.preprocess, options, ideal=ideal)
    write_json(out / "parity_trt.json", report.as_dict())
    record_added_file(out, out / "parity_trt.json")
    return Row(name, cfg_name, str(ckpt), precision, "tensorrt", report.ap_backend["bbox_mAP"],
               report.ap_backend["segm_mAP"], parity_cell(report), parity_figures(report))


def demo_holdout(dataset: CocoDataset, num_images: int) -> list[Path]:
    """The calibration check's held-out images: HOLDOUT of the evaluated ones, spread, never the first
    (the calibration image)."""
    count = min(num_images, len(dataset))
    return [dataset[i][1] for i in holdout_indices(count, [0], HOLDOUT)]


def check_cell(check: dict) -> str:
    """The calibration check's verdict and figures over its images: matched share, box/mask AP against float."""
    s = check["sets"][check["judged_on"]]
    parts = [f"{check['verdict']} on {s['images']} images: matched {100 * s['matched_share']:.1f}%"]
    if s["box_ap_delta"] is not None:
        parts.append(f"box {100 * s['box_ap_delta']:+.1f}, mask {100 * s['mask_ap_delta']:+.1f}")
    b = check["bound"]
    parts.append(f"bound {100 * b['min_matched_share']:.0f}%, -{100 * b['max_ap_loss']:.0f}")
    return "; ".join(parts)


def parity_cell(report: ParityReport) -> str:
    """The verdict and its figures: codes differing, matched share with float64 against torch float32's, AP
    deltas against float64 against torch's, each excess's 95% interval (points)."""
    parts = ["PASS" if report.ok else "FAIL"]
    if report.codes:
        parts.append(f"{report.code_mismatches} of {report.code_elements / 1e6:.1f} M codes differ")
    env = report.envelope
    if env is not None and not env.judged:
        parts.append(f"tiers 2/3 not judged: {env.images} image(s), the float64 rule needs at least {MIN_IMAGES}")
    elif env is not None:
        m, box, mask = (env.figure(n) for n in ("matched", "bbox_AP", "segm_AP"))
        parts.append(f"matched {100 * m.backend:.1f}% vs torch {100 * m.reference:.1f}% "
                     f"[{100 * m.low:+.1f}, {100 * m.high:+.1f}]")
        for label, f in (("box", box), ("mask", mask)):
            parts.append(f"{label} dAP {100 * f.backend:+.2f} vs {100 * f.reference:+.2f} "
                         f"[{100 * f.low:+.2f}, {100 * f.high:+.2f}]")
    return "; ".join(parts)


def parity_figures(report: ParityReport) -> dict:
    """The figures of `parity_cell` for --json-out (fractions)."""
    return {"pass": report.ok, "tier1_pass": report.tier1_ok, "codes_differing": report.code_mismatches,
            "codes": report.code_elements, "tier2_pass": report.tier2_ok, "tier3_pass": report.tier3_ok,
            "float64": None if report.envelope is None else report.envelope.as_dict()}


def check_demo_args(args: argparse.Namespace) -> None:
    """Refuse what would fail after minutes of work: a --work-dir that is a file, a --json-out folder, bits."""
    from ..export.forms import ONNXRUNTIME, check_export_bits

    for folder in (args.work_dir, *args.work_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--work-dir {args.work_dir}: {folder} is a file, not a folder")
    output_file(args.json_out, "--json-out")
    check_not_an_input({"--json-out": args.json_out, "--work-dir": args.work_dir},
                       {"--ckpt": args.ckpt, "--config": args.config, "--ann": args.ann, "--img-dir": args.img_dir})
    for n in args.bits:
        check_export_bits(n, n, ONNXRUNTIME, "--bits", "--bits")
    names = [args.ckpt.stem] if args.ckpt else [name for name, _, _ in BUNDLED]
    for name in names:  # the artifact folders the demo replaces: only ones it wrote, unchanged
        for n in args.bits:
            for suffix in ("", "-tensorrt"):
                check_replaceable(args.work_dir / f"{name}-w{n}a{n}{suffix}", True, "--work-dir", kind=ARTIFACT)


def run_demo(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    start = time.time()
    if (args.ann is None) != (args.img_dir is None):
        raise UserError("--ann and --img-dir go together")
    check_demo_args(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ann, img_dir = (args.ann, args.img_dir) if args.ann else synthetic_set(args.work_dir, args.num_images)
    if args.ckpt:
        models = [(args.ckpt.stem, args.ckpt, args.config)]
    else:
        missing = [str(p) for _, p, _ in BUNDLED if not p.is_file()]
        if missing:
            raise UserError(f"bundled checkpoint missing: {missing[0]} (reinstall the package)")
        models = list(BUNDLED)
    rows: list[Row] = []
    print(format_table([]).strip())
    for name, ckpt, config in models:
        rows += run_model(name, ckpt, config, ann, img_dir, args)
    print(f"\n{format_table(rows)}\n\nAP: COCO AP@[.5:.95] x 100 on {min(args.num_images, len(CocoDataset(ann, img_dir)))} "
          f"images of {ann}. Accuracy vs float: the calibration check of the export (repq.json), fake quant "
          f"against float on the calibration image and {HOLDOUT} held-out ones: detections scoring >= 0.3 matched "
          f"one to one, box/mask AP delta, and the bound it is judged on (FAIL: the model lost more). Parity: tier 1 integer codes against fake quant; matched share and AP deltas "
          f"against the fake-quant model in float64, the backend's and torch float32's, [95% interval of the "
          f"backend's excess over torch, points]: {RULE} (details in {args.work_dir}/*/parity_*.json). "
          f"{time.time() - start:.0f} s.")
    from ..runtime.tensorrt_support import tensorrt_available

    trt_ok, trt_why = tensorrt_available()
    if not trt_ok:
        print(f"tensorrt rows skipped: {trt_why}")
    if args.json_out:
        write_json(args.json_out, [vars(r) for r in rows])
    # the exit code stays the parity verdict's: the check's column is judged on as few as one image
    # (--num-images 1 in CI), too few for a verdict that should fail a run
    failed = [r for r in rows if r.parity.startswith("FAIL")]
    return 1 if failed else 0
