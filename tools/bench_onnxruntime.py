#!/usr/bin/env python
"""onnxruntime CPU latency: float vs our two exact forms vs onnxruntime's own quantize_static.

Per detector, side by side in one run: the float graph, our TensorRT-form W4A4 graph, our
onnxruntime-form W4A4 / W6A6 / W8A8 graphs (W8A8 for target CPU 'any' and 'vnni'), and
quantize_static's INT8 QDQ model of the float graph.

    python tools/bench_onnxruntime.py                         # the two bundled detectors, 400x667
    python tools/bench_onnxruntime.py --full-size             # + Mask R-CNN Swin-T (random), 800x1199
    python tools/bench_onnxruntime.py --only-full-size --threads-list 2 --runs 5

Steps, each in its own process:
  1. export the float detector (bundled checkpoint, or random Swin-T weights with three classes
     made confident), then calibrate (one benchmark image) and export each quantized variant;
  2. quant_pre_process + quantize_static on the float graph (QDQ, per-channel int8 weights, uint8
     activations, MinMax on the same image, op types Conv/MatMul/Gemm);
  3. latency, once per thread count: every session open in one process (CPUExecutionProvider,
     the session options of repq-export's onnxruntime runner for every model: optimization level
     ORT_ENABLE_ALL, no memory pattern unless --mem-pattern on; 1 inter-op thread), --warmup runs each, then
     --runs rounds running every model once in turn; the median per model. RSS growth when a
     session opens and runs, the process's peak RSS, op types of the optimized graph, and one
     profiled run per model after the warm-up (kernel time by op type) at the largest thread count.
Prints Markdown tables. Timings are wall clock on a shared machine: compare rows of one run.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc
from repq_export.runtime.cpu_features import saturation_free

FLOAT, TRT4, ORT4, ORT6, ORT8, ORT8V, QSTATIC = ("float", "trt_w4a4", "ort_w4a4", "ort_w6a6", "ort_w8a8", "ort_w8a8_vnni",
                                                 "qstatic_int8")
VARIANTS = {  # name: (label, bits, form, target CPU)
    FLOAT: ("float", 0, None, "any"), TRT4: ("TensorRT form W4A4", 4, "tensorrt", "any"),
    ORT4: ("onnxruntime form W4A4", 4, "onnxruntime", "any"), ORT6: ("onnxruntime form W6A6", 6, "onnxruntime", "any"),
    ORT8: ("onnxruntime form W8A8", 8, "onnxruntime", "any"),
    ORT8V: ("onnxruntime form W8A8, target CPU vnni", 8, "onnxruntime", "vnni"),
    QSTATIC: ("quantize_static INT8", 0, None, "any")}
DETECTORS = {  # name: (checkpoint in the package's assets or None = random weights, config or arch, size)
    "mask_rcnn_swin_synthetic": ("mask_rcnn_swin_synthetic.pth", "synthetic/mask_rcnn_swin_synthetic.py", (400, 667)),
    "cascade_mask_rcnn_swin_synthetic": ("cascade_mask_rcnn_swin_synthetic.pth",
                                         "synthetic/cascade_mask_rcnn_swin_synthetic.py", (400, 667)),
    "mask_rcnn_swin_t": (None, "mask_rcnn_swin_t", (800, 1199)),
}
BUNDLED = ("mask_rcnn_swin_synthetic", "cascade_mask_rcnn_swin_synthetic")
QUANT_OPS = ("Conv", "MatMul", "Gemm")
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.bench_parser(__doc__, "torch threads for export/calibration")
    parser.add_argument("--threads-list", default="1,2", help="onnxruntime intra-op thread counts (default 1,2)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model first (default 1)")
    parser.add_argument("--full-size", action="store_true", help="also Mask R-CNN Swin-T, random weights, at --size")
    parser.add_argument("--only-full-size", action="store_true", help="only Mask R-CNN Swin-T at --size")
    parser.add_argument("--workdir", type=Path, help="where the .onnx files go (default: a temporary folder)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled run per model")
    parser.add_argument("--mem-pattern", choices=("off", "on"), default="off",
                        help="onnxruntime's memory pattern for every model (default off, as repq-export's runner)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- workers


def load_detector(name: str, seed: int):
    """The detector `name` in eval mode."""
    ckpt, cfg, _ = DETECTORS[name]
    if ckpt is None:
        return bc.random_detector(cfg, seed)
    from repq_export.models.checkpoint import load_checkpoint
    from repq_export.resources import ASSETS_DIR, CONFIGS_DIR

    return load_checkpoint(ASSETS_DIR / ckpt, CONFIGS_DIR / cfg)[0].eval()


def export_worker(task: dict) -> dict:
    """Export the float graph, or calibrate at task['bits'] and export in task['form']."""
    from repq_export.export.onnx_export import count_qdq, export_onnx
    from repq_export.quant.calibrate import quantize

    bc.set_threads(task["threads"])
    img, img_hw = bc.bench_image(tuple(task["size"]))
    model = load_detector(task["detector"], task["seed"])
    out: dict = {"calib_s": None}
    bits = task["bits"]
    if bits:
        out["calib_s"], model = bc.time_call(lambda: quantize(model, [(img, img_hw)], bits, bits, progress=False))
    form = task["form"] or "tensorrt"
    out["export_s"], proto = bc.time_call(lambda: export_onnx(model, task["path"], img, img_hw, form=form,
                                                              target_cpu=task["target_cpu"]))
    out.update(count_qdq(proto))
    return out


class ImageReader:
    """onnxruntime CalibrationDataReader over the benchmark image."""

    def __init__(self, size: tuple[int, int]) -> None:
        img, img_hw = bc.bench_image(size)
        self.items = [{"img": img.numpy(), "img_hw": img_hw.numpy()}]
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.items)


def ort_quantize_worker(task: dict) -> dict:
    """quant_pre_process (falling back to the raw graph) then quantize_static."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    bc.set_threads(task["threads"])
    src, pre = Path(task["float"]), Path(task["pre"])
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        model_in = pre
    except Exception:  # noqa: BLE001  onnxruntime raises assorted types; quantize the raw graph then
        model_in = src
    CalibrationDataReader.register(ImageReader)
    seconds, _ = bc.time_call(lambda: quantize_static(
        str(model_in), task["path"], ImageReader(tuple(task["size"])), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANT_OPS), per_channel=True, reduce_range=False,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax))
    return {"quant_s": seconds, "pre_processed": model_in == pre}


def session(path: str, threads: int, mem_pattern: bool, optimized: str | None = None, profile: str | None = None):
    """A CPU session with repq-export's runner options (the same for every model compared)."""
    import onnxruntime as ort
    from repq_export.runtime.ort_runner import session_options

    opts = session_options("all", threads)
    opts.inter_op_num_threads, opts.enable_mem_pattern = 1, mem_pattern
    if optimized:
        opts.optimized_model_filepath = optimized
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def profile_by_op(trace_path: str) -> dict[str, float]:
    """Kernel microseconds per op type in the last run of an onnxruntime profile (the earlier,
    warm-up runs pay for first-touch allocations)."""
    events = json.loads(Path(trace_path).read_text())
    last = max((ev.get("ts", 0) for ev in events if ev.get("cat") == "Session" and ev.get("name") == "model_run"),
               default=0)
    totals: collections.Counter = collections.Counter()
    for ev in events:
        args, name = ev.get("args", {}), ev.get("name", "")
        if ev.get("cat") == "Node" and name.endswith("_kernel_time") and "op_name" in args and ev.get("ts", 0) >= last:
            totals[args["op_name"]] += ev.get("dur", 0)
    return dict(totals)


def latency_worker(task: dict) -> dict:
    """Open every model, warm up, time round-robin; op types, optionally one profiled run each."""
    import onnx

    img, img_hw = bc.bench_image(tuple(task["size"]))
    feeds = {"img": img.numpy(), "img_hw": img_hw.numpy()}
    work, threads = Path(task["workdir"]), task["threads"]
    sessions, info = {}, {}
    for name, path in task["models"].items():
        rss0 = bc.rss_mib()
        opt = str(work / f"opt_{Path(path).name}")
        sess = session(path, threads, task["mem_pattern"], opt)
        for _ in range(task["warmup"]):
            sess.run(None, feeds)
        n_det = int(sess.run(None, feeds)[0].shape[0])
        ops = collections.Counter(n.op_type for n in onnx.load(opt, load_external_data=False).graph.node)
        sessions[name] = sess
        info[name] = {"n_det": n_det, "rss_growth": bc.rss_mib() - rss0, "ops": dict(ops), "times": []}
    for _ in range(task["runs"]):
        for name, sess in sessions.items():
            info[name]["times"].append(bc.time_call(lambda: sess.run(None, feeds))[0])
    for name in info:
        info[name]["times"] = bc.summarize(info[name]["times"])
    sessions.clear()
    if task["profile"]:
        for name, path in task["models"].items():
            sess = session(path, threads, task["mem_pattern"], None, str(work / f"profile_{name}"))
            for _ in range(1 + task["warmup"]):  # the last run is the one counted
                sess.run(None, feeds)
            info[name]["profile_us"] = profile_by_op(sess.end_profiling())
            del sess
    return {"models": info, "peak": bc.peak_rss_mib()}


# ----------------------------------------------------------------------------- report


def detector_report(name: str, size, files: dict, produced: dict, lat: dict, threads: list[int]) -> list[str]:
    """The Markdown table of one detector."""
    top = max(threads)
    med = {t: {m: v["times"]["median"] for m, v in lat[t]["models"].items()} for t in threads if "models" in lat[t]}
    rows = []
    for variant in VARIANTS:
        label, p = VARIANTS[variant][0], produced.get(variant, {})
        if variant not in files or "error" in p:
            rows.append([label, "-", *(["-"] * len(threads)), "-", "-", "-", "-", p.get("error", "not produced")])
            continue
        size_mib = Path(files[variant]).stat().st_size / 2**20
        float_mib = Path(files[FLOAT]).stat().st_size / 2**20
        row = [label, f"{size_mib:.1f} ({size_mib / float_mib:.2f}x)"]
        for t in threads:
            m = lat[t].get("models", {}).get(variant)
            row.append(bc.fmt_times(m["times"], 1000, 0) if m else "-")
        m_top = lat[top].get("models", {}).get(variant, {})
        ms = med.get(top, {})
        row.append(f"{ms[variant] / ms[FLOAT]:.2f}x" if variant in ms and FLOAT in ms else "-")
        row.append(f"{ms[variant] / ms[QSTATIC]:.2f}x" if variant in ms and QSTATIC in ms else "-")
        row.append(f"{m_top.get('rss_growth', 0):.0f}")
        ops = m_top.get("ops", {})
        row.append(", ".join(f"{op} {ops[op]}" for op in INTEGER_OPS if ops.get(op)) or "none")
        prof = m_top.get("profile_us")
        if prof:
            total = sum(prof.values()) or 1
            row.append(", ".join(f"{op} {100 * us / total:.0f}%" for op, us in
                                 sorted(prof.items(), key=lambda kv: -kv[1])[:5]))
        else:
            row.append("-")
        rows.append(row)
    header = ["model", "file MiB (vs float)", *[f"ms, {t} thread{'s' * (t > 1)} (min-max)" for t in threads],
              f"vs float ({top}t)", f"vs quantize_static ({top}t)", "RSS growth MiB", "integer kernels",
              "top op types (kernel time)"]
    peak = max((lat[t].get("peak", 0) for t in threads), default=0)
    return [f"### {name}, image {size[0]}x{size[1]}", "", bc.markdown_table(header, rows), "",
            f"- peak RSS of a latency process (all {len(files)} sessions open): {peak:.0f} MiB", ""]


# ----------------------------------------------------------------------------- main


def produce(name: str, args, work: Path) -> tuple[dict, dict]:
    """Every variant's file of detector `name`: (files, production results)."""
    size = args.size if DETECTORS[name][0] is None else DETECTORS[name][2]
    base = {"size": list(size), "threads": max(int(t) for t in args.threads_list.split(",")), "seed": args.seed,
            "detector": name}
    files, produced = {}, {}
    for variant, (label, bits, form, target_cpu) in VARIANTS.items():
        path = work / f"{name}_{variant}.onnx"
        print(f"[bench_onnxruntime] {name}: {label} ...", file=sys.stderr, flush=True)
        if target_cpu == "vnni" and not saturation_free():
            produced[variant] = {"error": "this CPU has no VNNI/AMX (its u8s8 kernels could saturate)"}
            continue
        if variant == QSTATIC:
            task = {**base, "kind": "ort_quantize", "float": files.get(FLOAT, ""), "pre": str(work / f"{name}_pre.onnx"),
                    "path": str(path)}
        else:
            task = {**base, "kind": "export", "bits": bits, "form": form, "target_cpu": target_cpu, "path": str(path)}
        produced[variant] = bc.run_worker(task)
        if "error" not in produced[variant] and path.exists():
            files[variant] = str(path)
    return files, produced


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        task = json.loads(args.worker)
        fn = {"export": export_worker, "ort_quantize": ort_quantize_worker, "latency": latency_worker}[task["kind"]]
        bc.emit_result(fn(task))
        return 0
    threads = sorted({int(t) for t in args.threads_list.split(",")})
    if args.runs < 1 or args.warmup < 0 or min(threads) < 1:
        print("error: --runs and --threads-list values must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    names = ["mask_rcnn_swin_t"] if args.only_full_size else [*BUNDLED, *(["mask_rcnn_swin_t"] * args.full_size)]
    start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ort_"))
    work.mkdir(parents=True, exist_ok=True)
    lines = ["## onnxruntime CPU latency: float vs the TensorRT and onnxruntime forms vs quantize_static", "",
             *bc.machine_lines(max(threads)), ""]
    try:
        for name in names:
            files, produced = produce(name, args, work)
            size = args.size if DETECTORS[name][0] is None else DETECTORS[name][2]
            lat = {}
            for t in threads:
                print(f"[bench_onnxruntime] {name}: latency, {t} thread(s) ...", file=sys.stderr, flush=True)
                lat[t] = bc.run_worker({"kind": "latency", "size": list(size), "threads": t, "models": files,
                                        "workdir": str(work), "runs": args.runs, "warmup": args.warmup,
                                        "mem_pattern": args.mem_pattern == "on",
                                        "profile": not args.no_profile and t == max(threads)})
            lines += detector_report(name, size, files, produced, lat, threads)
        lines += [f"Median of {args.runs} round-robin rounds after {args.warmup} warm-up run(s); onnxruntime's "
                  f"default optimization level, memory pattern {args.mem_pattern}; total wall time "
                  "{:.0f} s.".format(time.perf_counter() - start), "",
                  "Command: `" + bc.command_line() + "`"]
        print("\n".join(lines))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
