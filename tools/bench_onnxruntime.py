#!/usr/bin/env python
"""onnxruntime CPU latency of Mask R-CNN Swin-T: float, our W4A4/W6A6 QDQ, onnxruntime's own INT8.

The float graph, our W4A4 and W6A6 QDQ graphs, and onnxruntime's quantize_static INT8 QDQ model of
the same float graph, side by side.

    python tools/bench_onnxruntime.py                        # 800x1199 image (padded 800x1216)
    python tools/bench_onnxruntime.py --size 480x640 --runs 3 --workdir /tmp/ortbench --keep

Steps, each in its own process, one after the other in one run:
  1. export the float detector (random weights, three classes made confident) with export_onnx;
  2. calibrate it at W4A4 and W6A6 on the benchmark image and export each QDQ graph; W8A8 is
     attempted too (calibrated on a small image: what is refused is the weight codes) to show
     that the exporter refuses 8-bit asymmetric weights (their codes q - zp do not fit int8);
  3. onnxruntime's quant_pre_process, then quantize_static (QDQ, per-channel int8 weights,
     uint8 activations as onnxruntime advises for x86 CPUs with VNNI, MinMax calibration on the
     same image) on the float graph, quantizing the ops our graph quantizes (Conv, MatMul, Gemm);
  4. latency: all sessions open in one process (CPUExecutionProvider, default optimization level
     ORT_ENABLE_ALL, --threads intra-op threads, 1 inter-op thread), --warmup runs each, then
     --runs rounds that run every model once in turn (so load changes hit all models alike);
     the median per model. Each optimized graph is saved and its op types counted, and one
     profiled run per model gives the time share of each op type (--no-profile to skip).
Prints Markdown tables.
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

ARCH = "mask_rcnn_swin_t"
FLOAT, W4, W6, ORT_INT8 = "float.onnx", "repq_w4a4.onnx", "repq_w6a6.onnx", "ort_int8.onnx"
LABELS = {FLOAT: "float (export_onnx of the float model)", W4: "ours W4A4 QDQ", W6: "ours W6A6 QDQ",
          ORT_INT8: "onnxruntime quantize_static INT8 QDQ"}
QUANT_OPS = ("Conv", "MatMul", "Gemm")
# op types shown in the kernel table: integer kernels, float compute kernels, Q/DQ
KERNEL_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "ConvInteger",
              "MatMulInteger", "QGemm", "MatMulNBits", "Conv", "FusedConv", "NchwcConv", "MatMul", "FusedMatMul",
              "Gemm", "QuantizeLinear", "DequantizeLinear", "Clip")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.bench_parser(__doc__, "onnxruntime intra-op threads and torch threads for export/calibration")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model first (default 1)")
    parser.add_argument("--ort-calib-images", type=int, default=1,
                        help="images for quantize_static's calibration (default 1, as ours)")
    parser.add_argument("--ort-per-tensor", action="store_true",
                        help="quantize_static with per-tensor weights (default per-channel, as ours)")
    parser.add_argument("--workdir", type=Path,
                        help="where the .onnx files go (default: a temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary workdir (a --workdir you name is always kept)")
    parser.add_argument("--reuse", action="store_true",
                        help="use model files already in --workdir instead of producing them again")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled run per model")
    parser.add_argument("--skip-w8", action="store_true", help="skip the W8A8 export attempt")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- workers


def export_worker(task: dict) -> dict:
    """Export the float model, or calibrate at task['bits'] and export the QDQ graph."""
    from repq_export.errors import UserError
    from repq_export.export.onnx_export import count_qdq, export_onnx
    from repq_export.quant.calibrate import quantize

    bc.set_threads(task["threads"])
    img, img_hw = bc.bench_image(tuple(task["calib_size"] or task["size"]))
    model = bc.random_detector(ARCH, task["seed"])
    out: dict = {"calib_s": None}
    if task["bits"]:
        bits = task["bits"]
        out["calib_s"], model = bc.time_call(lambda: quantize(model, [(img, img_hw)], bits, bits, progress=False))
    try:
        out["export_s"], proto = bc.time_call(lambda: export_onnx(model, task["path"], img, img_hw))
    except UserError as exc:
        out["refused"] = str(exc)
        return out
    out.update(count_qdq(proto))
    out["nodes"] = len(proto.graph.node)
    out["peak"] = bc.peak_rss_mib()
    return out


class ImageReader:
    """onnxruntime CalibrationDataReader over preprocessed benchmark images."""

    def __init__(self, size: tuple[int, int], count: int) -> None:
        self.items = []
        for i in range(count):
            img, img_hw = bc.bench_image(size, index=i)
            self.items.append({"img": img.numpy(), "img_hw": img_hw.numpy()})
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.items)


def ort_quantize_worker(task: dict) -> dict:
    """quant_pre_process then quantize_static on the float graph."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    bc.set_threads(task["threads"])
    src, pre, dst = Path(task["float"]), Path(task["pre"]), Path(task["path"])
    out: dict = {"pre_process": None}
    start = time.perf_counter()
    for label, kwargs in (("full", {}), ("without symbolic shape inference", {"skip_symbolic_shape": True})):
        try:
            quant_pre_process(str(src), str(pre), **kwargs)
            out["pre_process"] = label
            break
        except Exception as exc:  # noqa: BLE001  onnxruntime raises assorted types; record and fall back
            out.setdefault("pre_errors", []).append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    out["pre_s"] = time.perf_counter() - start
    model_in = pre if out["pre_process"] else src
    reader = ImageReader(tuple(task["size"]), task["calib_images"])
    CalibrationDataReader.register(ImageReader)
    out["quant_s"], _ = bc.time_call(lambda: quantize_static(
        str(model_in), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANT_OPS),
        per_channel=task["per_channel"], reduce_range=False, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax))
    proto = onnx.load(str(dst))
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    out.update({"nodes": len(proto.graph.node), "QuantizeLinear": ops["QuantizeLinear"],
                "DequantizeLinear": ops["DequantizeLinear"], "peak": bc.peak_rss_mib()})
    return out


def session_options(threads: int, optimized_path: str | None = None, profile_prefix: str | None = None):
    """CPU session options: default optimization level (ALL), fixed threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def op_counts(path: str) -> dict[str, int]:
    """Op types of a (saved, optimized) graph."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    return dict(collections.Counter(n.op_type for n in proto.graph.node))


def profile_by_op(trace_path: str) -> tuple[dict[str, float], dict[str, float]]:
    """Microseconds per op type, and per quantizer subgraph, from an onnxruntime profile.

    Our exported node names carry the module path: the log-sqrt2 lowering of the softmax output
    lives under '.../matmul2/quantizer_a/', the uniform activation Clip/Q/DQ under other
    '.../*quantizer*/' scopes.
    """
    events = json.loads(Path(trace_path).read_text())
    totals: collections.Counter = collections.Counter()
    groups: collections.Counter = collections.Counter()
    for ev in events:
        args, name = ev.get("args", {}), ev.get("name", "")
        if ev.get("cat") == "Node" and name.endswith("_kernel_time") and "op_name" in args:
            totals[args["op_name"]] += ev.get("dur", 0)
            if "/matmul2/quantizer_a/" in name:
                groups["log_sqrt2"] += ev.get("dur", 0)
            elif "quantizer" in name:
                groups["uniform"] += ev.get("dur", 0)
    return dict(totals), dict(groups)


def latency_worker(task: dict) -> dict:
    """Open every model, warm up, time round-robin, then count kernels and (optionally) profile."""
    import onnxruntime as ort

    img, img_hw = bc.bench_image(tuple(task["size"]))
    feeds = {"img": img.numpy(), "img_hw": img_hw.numpy()}
    work = Path(task["workdir"])
    sessions, info = {}, {}
    for name in task["models"]:
        rss0 = bc.rss_mib()
        opt_path = str(work / f"optimized_{name}")
        t_open, sess = bc.time_call(lambda: ort.InferenceSession(
            str(work / name), session_options(task["threads"], opt_path), providers=["CPUExecutionProvider"]))
        sessions[name] = sess
        warm = [bc.time_call(lambda: sess.run(None, feeds))[0] for _ in range(task["warmup"])]
        out = sess.run(None, feeds)
        info[name] = {"open_s": t_open, "warm_s": warm, "n_det": int(out[0].shape[0]),
                      "rss_growth": bc.rss_mib() - rss0, "ops": op_counts(opt_path), "times": []}
    for _ in range(task["runs"]):
        for name, sess in sessions.items():
            info[name]["times"].append(bc.time_call(lambda: sess.run(None, feeds))[0])
    for name in task["models"]:
        info[name]["times"] = bc.summarize(info[name]["times"])
    sessions.clear()
    if task["profile"]:
        for name in task["models"]:
            sess = ort.InferenceSession(str(work / name), session_options(task["threads"], None,
                                        str(work / f"profile_{name}")), providers=["CPUExecutionProvider"])
            sess.run(None, feeds)
            info[name]["profile_us"], info[name]["quantizer_us"] = profile_by_op(sess.end_profiling())
            del sess
    return {"models": info, "peak": bc.peak_rss_mib()}


# ----------------------------------------------------------------------------- report


def mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f}" if path.exists() else "-"


def fmt_s(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def goal(models: dict) -> str:
    """'met' / 'NOT met (...)' for the issue's latency goal, from the medians."""
    med = {name: m["times"]["median"] for name, m in models.items()}
    if FLOAT not in med or ORT_INT8 not in med or W4 not in med:
        return "not measurable (a model is missing)"
    misses = [f"{LABELS[n]} {med[n] / med[FLOAT]:.2f}x float, {med[n] / med[ORT_INT8]:.2f}x ORT INT8"
              for n in (W4, W6) if n in med and not (med[n] <= med[ORT_INT8] and med[n] < med[FLOAT])]
    return "met" if not misses else "NOT met (" + "; ".join(misses) + ")"


def report(args, work: Path, produced: dict, lat: dict | None, wall: float) -> str:
    """The Markdown report."""
    size_txt = f"{args.size[0]}x{args.size[1]}"
    lines = [f"## onnxruntime CPU latency, Mask R-CNN Swin-T (random weights), image {size_txt}", "",
             *bc.machine_lines(args.threads), ""]
    rows = []
    for name in (FLOAT, W4, W6, ORT_INT8):
        p = produced.get(name, {})
        if "error" in p or "refused" in p:
            rows.append([LABELS[name], "-", "-", "-", p.get("error") or p.get("refused"), "-", "-"])
            continue
        if name == ORT_INT8:
            how = f"quant_pre_process {fmt_s(p.get('pre_s'))} s + quantize_static {fmt_s(p.get('quant_s'))} s"
            total = (p.get("pre_s") or 0) + (p.get("quant_s") or 0) if p.get("quant_s") is not None else None
        else:
            how = (f"calibration {fmt_s(p.get('calib_s'))} s + export {fmt_s(p.get('export_s'))} s"
                   if p.get("calib_s") is not None else f"export {fmt_s(p.get('export_s'))} s")
            total = (p.get("calib_s") or 0) + p["export_s"] if p.get("export_s") is not None else None
        rows.append([LABELS[name], mib(work / name), fmt_s(total), how, p.get("nodes", "-"),
                     p.get("QuantizeLinear", "-"), p.get("DequantizeLinear", "-")])
    if args.reuse:
        lines += [f"Models reused from {work} (their production times are those of the run that made them).", ""]
    lines += ["### Models", "",
              bc.markdown_table(["model", "file MiB", "produce s", "of which", "nodes", "QuantizeLinear",
                                 "DequantizeLinear"], rows), ""]
    w8 = produced.get("w8")
    if w8 is not None:
        msg = w8.get("refused") or w8.get("error") or "NOT refused (exported)"
        lines += [f"- W8A8: our exporter refuses 8-bit weights: `{msg}` (8-bit asymmetric weight codes q - zp "
                  "span up to [-255, 255] and do not fit int8; attempted on a model calibrated on a 256x320 "
                  "image, since the refusal concerns the weights only). The W8A8 row is therefore replaced "
                  "by W6A6."]
    ortq = produced.get(ORT_INT8, {})
    if ortq and "error" not in ortq:
        pre = ortq.get("pre_process") or "failed, quantized the raw float graph"
        lines.append(f"- quantize_static: QDQ, weights int8 {'per-tensor' if args.ort_per_tensor else 'per-channel'}, "
                     f"activations uint8 (onnxruntime's advice for x86 with VNNI), MinMax on "
                     f"{args.ort_calib_images} image(s), op types {', '.join(QUANT_OPS)} (what our graph quantizes); "
                     f"quant_pre_process: {pre}" +
                     (f" (errors: {'; '.join(ortq['pre_errors'])})" if ortq.get("pre_errors") else "") + ".")
    lines.append("")
    if lat is not None and "error" in lat:
        lines += [f"Latency: {lat['error']}", ""]
    elif lat is not None:
        models = lat["models"]
        base = models.get(FLOAT, {}).get("times", {}).get("median")
        ortm = models.get(ORT_INT8, {}).get("times", {}).get("median")
        rows = []
        for name, m in models.items():
            med = m["times"]["median"]
            rows.append([LABELS[name], bc.fmt_times(m["times"], 1000, 0),
                         f"{med / base:.2f}x" if base else "-", f"{med / ortm:.2f}x" if ortm else "-",
                         f"{m['open_s']:.1f}", m["n_det"], f"{m['rss_growth']:.0f}"])
        lines += [f"### Latency (ms, median of {args.runs} round-robin rounds after {args.warmup} warm-up)", "",
                  bc.markdown_table(["model", "latency ms (min-max)", "vs float", "vs ORT INT8",
                                     "session open s", "detections", "RSS growth MiB"], rows), "",
                  f"- peak RSS of the latency process (all sessions open): {lat['peak']:.0f} MiB.",
                  f"- the goal (issue 4: our QDQ graph no slower than onnxruntime's INT8 model and faster than "
                  f"float) is {goal(models)} on this CPU.",
                  "- onnxruntime's INT8 model is not the same arithmetic: 8-bit uniform everywhere, its Q/DQ also "
                  "on the outputs of the quantized ops (so Conv/MatMul/Gemm become QLinear* kernels), a uniform "
                  "quantizer on the softmax output; with random weights its accuracy is not measured here.", ""]
        shown = [op for op in KERNEL_OPS if any(m["ops"].get(op, 0) for m in models.values())]
        rows = [[LABELS[name]] + [m["ops"].get(op, 0) for op in shown] for name, m in models.items()]
        lines += ["### Kernels onnxruntime chose (op types in the optimized graph, ORT_ENABLE_ALL)", "",
                  bc.markdown_table(["model", *shown], rows), ""]
        if all("profile_us" in m for m in models.values()):
            rows = []
            for name, m in models.items():
                prof = m["profile_us"]
                total = sum(prof.values()) or 1
                top = sorted(prof.items(), key=lambda kv: -kv[1])[:7]
                groups = m.get("quantizer_us", {})
                quant = (f"{groups.get('log_sqrt2', 0) / 1000:.0f} ms ({100 * groups.get('log_sqrt2', 0) / total:.0f}%)"
                         f" / {groups.get('uniform', 0) / 1000:.0f} ms ({100 * groups.get('uniform', 0) / total:.0f}%)"
                         if name in (W4, W6) else "-")
                rows.append([LABELS[name], f"{total / 1000:.0f}",
                             ", ".join(f"{op} {100 * us / total:.0f}%" for op, us in top), quant])
            lines += ["### Where the time goes (one profiled run per model, node kernel time by op type)", "",
                      bc.markdown_table(["model", "kernel ms", "top op types (share of kernel time)",
                                         "our quantizer subgraphs: log-sqrt2 / uniform Clip-Q-DQ"], rows), "",
                      "- op types as onnxruntime runs them after its fusions (Conv/FusedConv/MatMul/Gemm = float "
                      "kernels; QLinearConv, QLinearMatMul, QGemm, MatMulIntegerToFloat = integer kernels).", ""]
    lines += [f"- total wall time of this run: {wall:.0f} s", "", "Command: `" + bc.command_line() + "`"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        task = json.loads(args.worker)
        fn = {"export": export_worker, "ort_quantize": ort_quantize_worker, "latency": latency_worker}[task["kind"]]
        bc.emit_result(fn(task))
        return 0
    if args.runs < 1 or args.warmup < 0 or args.threads < 1 or args.ort_calib_images < 1:
        print("error: --runs, --threads, --ort-calib-images must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.reuse and not args.workdir:
        print("error: --reuse needs --workdir", file=sys.stderr)
        return 2
    start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ort_"))
    work.mkdir(parents=True, exist_ok=True)
    base = {"size": list(args.size), "threads": args.threads, "seed": args.seed, "calib_size": None}
    produced: dict = {}
    cached = {}
    cache_file = work / "produced.json"
    if args.reuse and cache_file.exists():
        cached = json.loads(cache_file.read_text())
    try:
        for name, bits in ((FLOAT, 0), (W4, 4), (W6, 6)):
            if args.reuse and (work / name).exists() and name in cached:
                produced[name] = cached[name]
                continue
            print(f"[bench_onnxruntime] producing {name} ...", file=sys.stderr, flush=True)
            produced[name] = bc.run_worker({**base, "kind": "export", "bits": bits, "path": str(work / name)})
        if not args.skip_w8:
            print("[bench_onnxruntime] W8A8 export attempt ...", file=sys.stderr, flush=True)
            produced["w8"] = bc.run_worker({**base, "kind": "export", "bits": 8, "calib_size": [256, 320],
                                            "path": str(work / "repq_w8a8.onnx")})
        if args.reuse and (work / ORT_INT8).exists() and ORT_INT8 in cached:
            produced[ORT_INT8] = cached[ORT_INT8]
        elif (work / FLOAT).exists():
            print("[bench_onnxruntime] quantize_static ...", file=sys.stderr, flush=True)
            produced[ORT_INT8] = bc.run_worker({**base, "kind": "ort_quantize", "float": str(work / FLOAT),
                                                "pre": str(work / "float_pre.onnx"), "path": str(work / ORT_INT8),
                                                "calib_images": args.ort_calib_images,
                                                "per_channel": not args.ort_per_tensor})
        cache_file.write_text(json.dumps(produced))
        models = [n for n in (FLOAT, W4, W6, ORT_INT8) if (work / n).exists() and "error" not in produced.get(n, {})]
        lat = None
        if models and models[0] == FLOAT:
            print(f"[bench_onnxruntime] latency of {', '.join(models)} ...", file=sys.stderr, flush=True)
            lat = bc.run_worker({**base, "kind": "latency", "models": models, "workdir": str(work),
                                 "runs": args.runs, "warmup": args.warmup, "profile": not args.no_profile})
        print(report(args, work, produced, lat, time.perf_counter() - start))
    finally:
        if not (args.workdir or args.keep):
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
