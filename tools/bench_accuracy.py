#!/usr/bin/env python
"""Accuracy at speed: box/mask AP and latency of every precision a CPU user can pick, per detector.

On the same held-out synthetic images, calibrated on the same calibration images (another seed):
  - float: the float graph on onnxruntime, and on OpenVINO at f32;
  - onnxruntime's quantize_static INT8 of the float graph, MinMax and Percentile;
  - repq-export W8A8, W6A6, W4A4 (RepQ-ViT), and with --recon (block reconstruction; --recon-method gptq:
    GPTQ rounding instead);
each on onnxruntime and on OpenVINO (f32 inference precision).

    python tools/bench_accuracy.py                  # both bundled detectors, 200 images (long)
    python tools/bench_accuracy.py --quick          # 20 images, Mask R-CNN only
    python tools/bench_accuracy.py --num-images 100 --recon-bits 4
    python tools/bench_accuracy.py --num-images 100 --recon-method gptq   # the --recon gptq rows instead

How each row is made (each step in its own process; files and scores are kept in --workdir, so a
rerun with the same options reuses them; --fresh starts over):
  - the float graph: the checkpoint with the default deploy config's post-processing, exported to
    ONNX; the OpenVINO copy gets the RoiAlign NaN guard, as every OpenVINO graph of the project;
  - quantize_static: quant_pre_process, then QDQ, per-channel int8 weights, uint8 activations on
    Conv/MatMul/Gemm, calibrated on the calibration images; the OpenVINO copy gets the NaN guard;
  - ours: `repq-export` with the default onnxruntime deploy config (ExportRequest as the command
    builds it: --calib-ann on the calibration set, --calib-images, --holdout, --accept-accuracy-loss,
    --recon); the OpenVINO graph is the same quantization state (its quant.pth) exported as
    deploy_configs/instance-seg_openvino_cpu.py does: the OpenVINO form (below 8 bits the TensorRT
    form's nodes; at 8 bits uint8 activations and offset int8 weights), with the RoiAlign NaN guard;
  - scoring: tools/test.py's evaluation (evaluation/image_loop.py: run_dataset; evaluate.py: score_run) on the
    first --num-images images of the held-out set; latency is the runner call alone (preprocessing
    and mask pasting excluded), median over those images after one warm-up call, at --threads, and
    at 1 thread over the first --one-thread-images images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import bench_common as bc

VAL_SEED = 77077  # the held-out set's seed: never used while tuning anything
CALIB_SEED = 77078  # the calibration set's seed (another set: no image is scored that calibrated)
BUNDLED = ("mask_rcnn_swin_synthetic", "cascade_mask_rcnn_swin_synthetic")
ORT, OPENVINO = "onnxruntime", "OpenVINO"
QSTATIC_METHODS = ("MinMax", "Percentile")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detectors", nargs="+", choices=BUNDLED, default=list(BUNDLED), help="bundled detectors")
    p.add_argument("--ckpt", type=Path, help="your checkpoint instead of the bundled ones (with --config)")
    p.add_argument("--config", type=Path, help="config of --ckpt")
    p.add_argument("--num-images", type=int, nargs="+", default=[200], help="held-out images scored, one count "
                   "per detector in order (the last repeats; default 200): each scores the first N of one set")
    p.add_argument("--val-seed", type=int, default=VAL_SEED, help=f"held-out set's seed (default {VAL_SEED})")
    p.add_argument("--calib-seed", type=int, default=CALIB_SEED, help=f"calibration set's seed (default {CALIB_SEED})")
    p.add_argument("--calib-images", type=int, default=8, help="calibration images, for ours and quantize_static "
                   "alike (default 8, repq-export's default), spread over the calibration set")
    p.add_argument("--holdout", type=int, default=8, help="images of the calibration set for repq-export's "
                   "calibration check (default 8, its default)")
    p.add_argument("--bits", type=int, nargs="*", default=[8, 6, 4], help="our WnAn precisions (default 8 6 4)")
    p.add_argument("--recon-bits", type=int, nargs="*", default=[6, 4], help="precisions also run with --recon "
                   "(default 6 4)")
    p.add_argument("--recon-iters", type=int, help="--recon-iters of repq-export (default: its own)")
    p.add_argument("--recon-method", choices=("adaround", "gptq"), default="adaround", help="the --recon method of "
                   "the --recon-bits rows (default adaround, what a bare --recon runs; gptq: --recon gptq)")
    p.add_argument("--qstatic", nargs="*", choices=QSTATIC_METHODS, default=list(QSTATIC_METHODS),
                   help="quantize_static calibration methods (default both)")
    p.add_argument("--backends", nargs="+", choices=(ORT, OPENVINO), default=[ORT, OPENVINO])
    p.add_argument("--qstatic-openvino", action="store_true", help="also score quantize_static's graphs on "
                   "OpenVINO (NaN-guarded copies)")
    p.add_argument("--threads", type=int, default=2, help="runtime threads of the scored pass (default 2)")
    p.add_argument("--one-thread-images", type=int, default=10, help="images timed again at 1 thread (default "
                   "10; 0 skips)")
    p.add_argument("--quick", action="store_true", help="20 images, the first detector only")
    p.add_argument("--workdir", type=Path, default=Path("repq-out/bench-accuracy"), help="sets, graphs and "
                   "scores (default ./repq-out/bench-accuracy, reused by a rerun with the same options)")
    p.add_argument("--fresh", action="store_true", help="delete this run's detector folders in --workdir first")
    p.add_argument("--out", type=Path, default=bc.ROOT / "benchmarks/results/bench_accuracy.md",
                   help="Markdown results file (default benchmarks/results/bench_accuracy.md)")
    p.add_argument("--json-out", type=Path, help="also write every row's figures as JSON")
    p.add_argument("--cached-only", action="store_true", help="only the table of what earlier runs made and scored "
                   "in --workdir (rows they did not reach say so)")
    p.add_argument("--make-only", action="store_true", help="make the graphs only (to prepare a later run)")
    p.add_argument("--in-process", action="store_true", help="run every step in this process (small models: "
                   "saves a process start per step)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.detectors = [min(args.num_images[0], 20)], args.detectors[:1]
    return args


# ----------------------------------------------------------------------------- inputs


def detector_files(args: argparse.Namespace) -> list[tuple[str, Path, Path | None]]:
    """(name, checkpoint, config) of each detector to run."""
    from repq_export.resources import ASSETS_DIR, CONFIGS_DIR

    if args.ckpt is not None:
        return [(args.ckpt.stem, args.ckpt.resolve(), args.config.resolve() if args.config else None)]
    return [(n, ASSETS_DIR / f"{n}.pth", CONFIGS_DIR / f"synthetic/{n}.py") for n in args.detectors]


def synthetic_sets(args: argparse.Namespace) -> dict[str, str]:
    """The held-out and calibration sets (made once in --workdir): annotation files and image folders."""
    from repq_export.data.synthetic import make_synthetic_set

    calib_n = args.calib_images + args.holdout
    count = max(args.num_images)
    val_root = args.workdir / f"val-seed{args.val_seed}-{count}"
    cal_root = args.workdir / f"calib-seed{args.calib_seed}-{calib_n}"
    val = make_synthetic_set(val_root, "val", count, args.val_seed)
    cal = make_synthetic_set(cal_root, "calib", calib_n, args.calib_seed)
    return {"val_ann": str(val), "val_dir": str(val_root / "val"), "cal_ann": str(cal), "cal_dir": str(cal_root / "calib")}


def calibration_paths(sets: dict[str, str], count: int) -> list[Path]:
    """The calibration images repq-export takes from the calibration set (spread, from the first)."""
    from repq_export.data.calibration_choice import spread_indices
    from repq_export.data.coco import CocoDataset

    data = CocoDataset(Path(sets["cal_ann"]), Path(sets["cal_dir"]), metrics=())
    return [data[i][1] for i in spread_indices(len(data), count)]


# ----------------------------------------------------------------------------- workers: the graphs


def float_worker(task: dict) -> dict:
    """The float graph (onnxruntime) and its NaN-guarded copy (OpenVINO)."""
    import onnx

    from repq_export.deploy_config import load_deploy_config
    from repq_export.artifact.detector import apply_post_processing
    from repq_export.export.nan_guard import guard_roi_align_nans
    from repq_export.export.forms import ONNXRUNTIME
    from repq_export.export.onnx_export import export_onnx, write_model
    from repq_export.models.checkpoint import load_checkpoint
    from repq_export.resources import DEFAULT_DEPLOY_CONFIG
    from repq_export.data.images import preprocess_file

    bc.set_threads(task["threads"])
    deploy = load_deploy_config(DEFAULT_DEPLOY_CONFIG)
    detector, info = load_checkpoint(Path(task["ckpt"]), Path(task["config"]) if task["config"] else None)
    apply_post_processing(detector, deploy.codebase.post_processing)
    prep = preprocess_file(calibration_paths(task["sets"], 1)[0], info.preprocess)
    export_onnx(detector.eval(), task["ort"], prep.tensor, prep.img_hw_tensor, deploy.onnx, form=ONNXRUNTIME)
    guarded = onnx.load(task["ort"])
    guard_roi_align_nans(guarded)
    write_model(guarded, task["openvino"])
    return {}


class CalibrationReader:
    """onnxruntime CalibrationDataReader over the calibration images, preprocessed as every runner is fed.

    With ``set_range`` (quantize_static's 'CalibStridedMinMax' option, stride 1) the calibrator
    collects one image at a time: its histogram collector cannot stack tensors whose shapes differ
    between images (image sizes, RoI counts), and its memory stays one image's."""

    def __init__(self, paths: list[Path], settings) -> None:
        from repq_export.data.images import preprocess_file

        imgs = [preprocess_file(p, settings) for p in paths]
        self.items = [{"img": p.tensor.numpy(), "img_hw": p.img_hw_tensor.numpy()} for p in imgs]
        self.it = iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def get_next(self):
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.items)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.it = iter(self.items[start_index:end_index])


def qstatic_worker(task: dict) -> dict:
    """quant_pre_process (falling back to the raw graph) then quantize_static; a NaN-guarded copy for OpenVINO."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from repq_export.export.nan_guard import guard_roi_align_nans
    from repq_export.export.onnx_export import write_model
    from repq_export.models.checkpoint import load_checkpoint

    bc.set_threads(task["threads"])
    settings = load_checkpoint(Path(task["ckpt"]), Path(task["config"]) if task["config"] else None)[1].preprocess
    src, pre = Path(task["float"]), Path(task["ort"]).with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        model_in = pre
    except Exception:  # noqa: BLE001  onnxruntime raises assorted types; quantize the raw graph then
        model_in = src
    CalibrationDataReader.register(CalibrationReader)
    reader = CalibrationReader(calibration_paths(task["sets"], task["calib_images"]), settings)
    method = getattr(CalibrationMethod, task["method"])
    seconds, _ = bc.time_call(lambda: quantize_static(
        str(model_in), task["ort"], reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=method, extra_options={"CalibStridedMinMax": 1}))
    guarded = onnx.load(task["ort"])
    guard_roi_align_nans(guarded)
    write_model(guarded, task["openvino"])
    return {"make_s": seconds, "pre_processed": model_in == pre}


def ours_worker(task: dict) -> dict:
    """repq-export's artifact (default onnxruntime deploy config), then its state in the OpenVINO form."""
    from repq_export.data.images import preprocess_file
    from repq_export.deploy_config import load_deploy_config
    from repq_export.artifact.artifact_file import Artifact
    from repq_export.artifact.detector import fake_quant_model
    from repq_export.export.artifact import ExportRequest, export_artifact
    from repq_export.export.forms import (ONNXRUNTIME, form_for, log_sqrt2_lowering_for, supported_bits,
                                         unshared_weights_for)
    from repq_export.export.onnx_export import export_onnx
    from repq_export.quant.recon_settings import GptqSettings, ReconSettings
    from repq_export.resources import DEPLOY_CONFIGS_DIR

    bc.set_threads(task["threads"])
    bits, out, sets = task["bits"], Path(task["artifact"]), task["sets"]
    recon = None
    if task["recon"] == "gptq":
        recon = GptqSettings()
    elif task["recon"]:
        recon = ReconSettings() if task["recon_iters"] is None else ReconSettings(iters=task["recon_iters"])
    req = ExportRequest(ckpt=Path(task["ckpt"]), out=out, w_bits=bits, a_bits=bits,
                        config=Path(task["config"]) if task["config"] else None, calib_ann=Path(sets["cal_ann"]),
                        calib_img_dir=Path(sets["cal_dir"]), calib_images=task["calib_images"],
                        holdout=task["holdout"], accept_accuracy_loss=True, force=True, recon=recon)
    seconds, _ = bc.time_call(lambda: export_artifact(req, progress=False, log=lambda *a: print(*a, file=sys.stderr)))
    artifact = Artifact.open(out)
    qmodel, settings = fake_quant_model(artifact), artifact.preprocess
    deploy = load_deploy_config(DEPLOY_CONFIGS_DIR / "instance-seg_openvino_cpu.py")
    form = form_for(deploy) if bits in supported_bits(form_for(deploy)) else ONNXRUNTIME
    prep = preprocess_file(calibration_paths(sets, 1)[0], settings)
    export_onnx(qmodel, task["openvino"], prep.tensor, prep.img_hw_tensor, deploy.onnx, form=form, roi_nan_guard=True,
                log_sqrt2=log_sqrt2_lowering_for(deploy), unshared_weights=unshared_weights_for(deploy))
    check = artifact.calibration_check
    return {"make_s": seconds, "openvino_form": form, "calibration_check": check["verdict"]}


# ----------------------------------------------------------------------------- workers: scoring


class TimedRunner:
    """A Runner that records the wall time of each call (the network alone)."""

    def __init__(self, runner) -> None:
        self.runner, self.name, self.times = runner, runner.name, []

    def __call__(self, img, img_hw):
        start = time.perf_counter()
        out = self.runner(img, img_hw)
        self.times.append(time.perf_counter() - start)
        return out


def make_runner(backend: str, path: str, threads: int):
    """onnxruntime (the default deploy config's settings) or OpenVINO at f32, with `threads` threads."""
    if backend == ORT:
        from repq_export.runtime.ort_runner import OrtRunner

        return OrtRunner(path, opt_level="all", providers=["CPUExecutionProvider"], threads=threads)
    from repq_export.runtime.openvino_runner import OpenVINORunner

    return OpenVINORunner(path, "f32", threads)


def eval_worker(task: dict) -> dict:
    """tools/test.py's evaluation of one graph on one backend, with the runner's time per image."""
    from repq_export.data.coco import CocoDataset
    from repq_export.evaluation.evaluate import score_run
    from repq_export.evaluation.image_loop import run_dataset, run_image
    from repq_export.models.checkpoint import load_checkpoint

    bc.set_threads(task["threads"])
    settings = load_checkpoint(Path(task["ckpt"]), Path(task["config"]) if task["config"] else None)[1].preprocess
    sets = task["sets"]
    dataset = CocoDataset(Path(sets["val_ann"]), Path(sets["val_dir"]))
    runner = make_runner(task["backend"], task["model"], task["threads"])
    run_image(runner, dataset[0][1], settings)  # warm-up, untimed
    timed = TimedRunner(runner)
    scored = run_dataset(timed, dataset, settings, task["num_images"], progress=False)
    metrics = score_run(scored, dataset)
    out = {"box_ap": metrics["bbox_mAP"], "mask_ap": metrics["segm_mAP"], "images": len(scored.images),
           "ms": 1000 * statistics.median(timed.times), "runtime_precision": getattr(runner, "precision", "fp32"),
           "detections": sum(len(im.dets.scores) for im in scored.images)}
    del runner
    if task["one_thread_images"] and task["threads"] != 1:
        one = make_runner(task["backend"], task["model"], 1)
        run_image(one, dataset[0][1], settings)
        timed1 = TimedRunner(one)
        run_dataset(timed1, dataset, settings, min(task["one_thread_images"], task["num_images"]), progress=False,
                    slim=True)
        out["ms_1t"] = 1000 * statistics.median(timed1.times)
    return out


# ----------------------------------------------------------------------------- plan and report


def plan(args: argparse.Namespace) -> list[dict]:
    """The rows of one detector, in table order: what makes each graph and which backend scores it."""
    rows = [{"key": "float", "variant": "float", "make": "float", "precision": "fp32"}]
    rows += [{"key": f"qstatic_{m.lower()}", "variant": f"quantize_static {m}", "make": "qstatic", "method": m,
              "precision": "INT8 (W8A8)"} for m in args.qstatic]
    for bits in args.bits:
        rows.append({"key": f"w{bits}a{bits}", "variant": "repq-export", "make": "ours", "bits": bits, "recon": False,
                     "precision": f"W{bits}A{bits}"})
    for bits in args.recon_bits if args.recon_method == "gptq" else ():
        rows.append({"key": f"w{bits}a{bits}_gptq", "variant": "repq-export --recon gptq", "make": "ours",
                     "bits": bits, "recon": "gptq", "precision": f"W{bits}A{bits}"})
    for bits in args.recon_bits if args.recon_method == "adaround" else ():
        iters = "" if args.recon_iters is None else f"_{args.recon_iters}it"
        rows.append({"key": f"w{bits}a{bits}_recon{iters}", "variant": "repq-export --recon", "make": "ours", "bits": bits,
                     "recon": True, "precision": f"W{bits}A{bits}"})
    return [{**r, "backend": b} for b in args.backends for r in rows
            if b == ORT or r["make"] != "qstatic" or args.qstatic_openvino]


def make_graphs(spec: dict, base: dict, folder: Path, args: argparse.Namespace) -> dict:
    """Make (or reuse) the graphs of one row's variant: {'ort': path, 'openvino': path, ...}."""
    files = {"ort": str(folder / f"{spec['key']}.onnx"), "openvino": str(folder / f"{spec['key']}_openvino.onnx")}
    done = folder / f"{spec['key']}.made.json"
    if not args.cached_only:
        wait_for_other_maker(folder / f"{spec['key']}.making", done)
    if done.is_file():
        return json.loads(done.read_text())
    if args.cached_only:
        return {"error": "not run (--cached-only: not made by an earlier run)"}
    task = {**base, **files, "kind": spec["make"]}
    if spec["make"] == "qstatic":
        task.update(method=spec["method"], float=str(folder / "float.onnx"))
    if spec["make"] == "ours":
        files["ort"] = str(folder / spec["key"] / "model.onnx")
        task.update(files, artifact=str(folder / spec["key"]), bits=spec["bits"], recon=spec["recon"],
                    recon_iters=args.recon_iters, holdout=args.holdout)
    log(f"{folder.name}: making {spec['key']} ...")
    lock = folder / f"{spec['key']}.making"
    lock.write_text(str(os.getpid()))
    try:
        made = {**run_task(task, args), **files}
    finally:
        lock.unlink(missing_ok=True)
    if "error" not in made:
        done.write_text(json.dumps(made))
    return made


def wait_for_other_maker(lock: Path, done: Path) -> None:
    """Wait while another run of this script (its pid in `lock`) makes the same graphs: runs with
    different --bits can make a detector's variants side by side."""
    while lock.is_file() and not done.is_file():
        try:
            os.kill(int(lock.read_text()), 0)
        except (ValueError, ProcessLookupError, FileNotFoundError):
            return
        time.sleep(10)


def score(spec: dict, made: dict, base: dict, folder: Path, args: argparse.Namespace, images: int) -> dict:
    """Score (or reuse the score of) one row on the first `images` held-out images."""
    tag = f"{spec['key']}_{spec['backend']}_{images}img_{args.threads}t_{args.one_thread_images}"
    done = folder / f"score_{tag}.json"
    if done.is_file():
        return json.loads(done.read_text())
    if "error" in made:
        return {"error": made["error"] if args.cached_only else "graph not made"}
    if args.cached_only:
        return {"error": f"not run (--cached-only: not scored on {images} images by an earlier run)"}
    log(f"{folder.name}: scoring {spec['key']} on {spec['backend']} ...")
    model = made["ort" if spec["backend"] == ORT else "openvino"]
    result = run_task({**base, "kind": "eval", "backend": spec["backend"], "model": model,
                            "num_images": images, "one_thread_images": args.one_thread_images}, args)
    if "error" not in result:
        done.write_text(json.dumps(result))
    return result


def run_detector(name: str, ckpt: Path, config: Path | None, sets: dict, args: argparse.Namespace,
                 images: int) -> list[dict]:
    """Every row of one detector: graphs made, then scored."""
    # the graphs depend on the detector and the calibration only: a rerun with other images or threads reuses them
    folder = args.workdir / f"{name}-calib{args.calib_seed}x{args.calib_images}h{args.holdout}"
    if args.fresh and folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = {"ckpt": str(ckpt), "config": str(config) if config else None, "sets": sets, "threads": args.threads,
            "calib_images": args.calib_images}
    made: dict[str, dict] = {}
    rows = []
    for spec in plan(args):
        if spec["key"] not in made:
            made[spec["key"]] = make_graphs(spec, base, folder, args)
        if args.make_only:
            continue
        rows.append({**spec, **made[spec["key"]], **score(spec, made[spec["key"]], base, folder, args, images)})
    return rows


def run_task(task: dict, args: argparse.Namespace) -> dict:
    """One step in a worker process (its memory freed after it), or here with --in-process."""
    if args.in_process:
        return WORKERS[task["kind"]](task)
    return bc.run_worker(task)


def ap(value: float | None) -> str:
    """AP as a percentage with one decimal, '-' where missing."""
    return "-" if value is None else f"{100 * value:.1f}"


def detector_table(rows: list[dict], threads: int) -> str:
    """The Markdown table of one detector; deltas against the float graph on the same backend."""
    floats = {r["backend"]: r for r in rows if r["key"] == "float" and "box_ap" in r}
    out = []
    for r in rows:
        if "box_ap" not in r:
            out.append([r["variant"], r["backend"], r["precision"], "-", "-", r.get("error", "failed"), "-", "-"])
            continue
        f = floats.get(r["backend"])
        delta = "-" if f is None or r["key"] == "float" else \
            f"{100 * (r['box_ap'] - f['box_ap']):+.1f} / {100 * (r['mask_ap'] - f['mask_ap']):+.1f}"
        precision = r["precision"] + (f", {r['openvino_form']} form" if r["backend"] == OPENVINO and
                                      r.get("openvino_form") else "")
        out.append([r["variant"], r["backend"], precision, ap(r["box_ap"]), ap(r["mask_ap"]), delta,
                    f"{r['ms']:.0f}", f"{r['ms_1t']:.0f}" if "ms_1t" in r else "-"])
    header = ["variant", "backend", "precision", "box AP", "mask AP", "delta vs float (box / mask)",
              f"ms/image, {threads} thread{'s' * (threads > 1)}", "ms/image, 1 thread"]
    return bc.markdown_table(header, out)


def log(text: str) -> None:
    """Progress on stderr."""
    print(f"[bench_accuracy] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        task = json.loads(args.worker)
        bc.emit_result(WORKERS[task["kind"]](task))
        return 0
    args.workdir = args.workdir.resolve()
    start = time.perf_counter()
    head = ["## Accuracy at speed: float, quantize_static and repq-export on onnxruntime and OpenVINO", "",
            *bc.machine_lines(args.threads), f"- {openvino_version()}", ""]
    args.workdir.mkdir(parents=True, exist_ok=True)
    log(f"synthetic sets in {args.workdir} ...")
    sets = synthetic_sets(args)
    if args.make_only:
        for name, ckpt, config in detector_files(args):
            run_detector(name, ckpt, config, sets, args, 0)
        return 0
    body, everything = [], {}
    for i, (name, ckpt, config) in enumerate(detector_files(args)):
        images = args.num_images[min(i, len(args.num_images) - 1)]
        rows = run_detector(name, ckpt, config, sets, args, images)
        everything[name] = rows
        body += [f"### {name}, {images} held-out images", "", detector_table(rows, args.threads), ""]
        for r in rows:
            if r["key"].startswith("w") and r["backend"] == (args.backends[0]) and "calibration_check" in r:
                method = " --recon gptq" if r["recon"] == "gptq" else " --recon" if r["recon"] else ""
                body.append(f"- {r['precision']}{method}: calibration check "
                            f"{r['calibration_check']}, made in {r['make_s']:.0f} s")
        body.append("")
    load = os.getloadavg()
    text = "\n".join(head + [
        f"Held-out set: the first N (per detector, below) images of a synthetic set of {max(args.num_images)}, seed "
        f"{args.val_seed} (tools/make_synthetic_coco.py --seed {args.val_seed}); calibration: {args.calib_images} images spread over another synthetic set, seed "
        f"{args.calib_seed} ({args.holdout} more of it for repq-export's calibration check), the same images for "
        "quantize_static and repq-export. Latency: median runner call per image (preprocessing and mask pasting "
        "excluded) after one warm-up call; the 1-thread column over the first "
        f"{args.one_thread_images} images. Delta: against the float graph on the same backend.",
        "", *body,
        f"Total wall time {time.perf_counter() - start:.0f} s; load average at the end {load[0]:.2f} / "
        f"{load[1]:.2f} / {load[2]:.2f}.", "", "Command: `" + bc.command_line() + "`", ""])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json_out:
        args.json_out.write_text(json.dumps(everything, indent=1) + "\n")
    return 0


def openvino_version() -> str:
    """'openvino X' or 'openvino not installed'."""
    try:
        import openvino

        return f"openvino {openvino.get_version().split('-')[0]}"
    except ImportError:
        return "openvino not installed"


WORKERS = {"float": float_worker, "qstatic": qstatic_worker, "ours": ours_worker, "eval": eval_worker}

if __name__ == "__main__":
    sys.exit(main())
