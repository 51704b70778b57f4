#!/usr/bin/env python
"""CPU latency against what CPU users pick: onnxruntime and OpenVINO, float, quantize_static, ours.

Per detector, side by side in one run (one process per thread count, every model open in it):

- onnxruntime: the float graph, quantize_static's INT8 QDQ graph of it, our onnxruntime form at
  W4A4 / W6A6 / W8A8 (target CPU 'vnni' where the CPU has VNNI or AMX);
- OpenVINO (CPU plugin): the float graph at inference precision f32 and bf16 (compiled for dynamic
  shapes, as `compile_model('model.onnx')` gives it, and bf16 also compiled for the input's shape),
  quantize_static's graph (f32), and our OpenVINO form at W4A4 / W6A6 / W8A8 (deploy config
  instance-seg_openvino_cpu.py: OpenVINO form, RoiAlign NaN guard, bisected log-sqrt2, unshared
  weight codes), at f32 and compiled as the deploy config says (static_shapes: for the input's shape);
- with --experiments also: OpenVINO W4A4 without the NaN guard (the guard's cost), with the table
  log-sqrt2 lowering (Log + GatherElements), compiled for dynamic shapes; OpenVINO bf16 on our W4A4
  and W8A8 graphs (faster, but not what the verdict passes).

    python tools/bench_cpu.py                      # the bundled detectors (400x667) + Swin-T 800x1216
    python tools/bench_cpu.py --no-full-size --runs 3
    python tools/bench_cpu.py --only-full-size --threads-list 2 --experiments
    python tools/bench_cpu.py --quick             # smoke run: bundled Mask R-CNN, W4A4, 2 threads, 2 rounds

For each model: median latency at each thread count (--runs rounds, every model once per round
in turn, after --warmup untimed runs), the peak RSS growth while it opens and runs its first
runs (VmHWM reset before each model), and which integer kernels ran: for OpenVINO, the runtime
model's Convolution / MatMul / FullyConnected nodes whose runtime precision is i8/u8 (rt_info
'layerType', 'runtimePrecision'); for onnxruntime, the integer op types of the optimized graph.
The goal lines compare, at full size on the largest thread count, our fastest W4A4 and W8A8 graph
(either backend) with OpenVINO bf16 float (goal >= 1.3x faster) and onnxruntime float (>= 2.5x);
a missed goal prints the OpenVINO per-layer profile (PERF_COUNT) of the candidate by op type.
Timings are wall clock on a possibly shared machine: compare rows of one run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc
import bench_onnxruntime as bo

ORT, OV = "onnxruntime", "openvino"
DYN, STATIC = False, True  # OpenVINO: compiled for the graph's dynamic shapes, or for the input's shape
# name: (label, backend, source file key, OpenVINO precision, static shapes, experiment only)
VARIANTS = {
    "ort_float": ("onnxruntime float", ORT, "float", None, DYN, False),
    "ort_qstatic": ("onnxruntime quantize_static INT8", ORT, "qstatic", None, DYN, False),
    "ort_w4": ("onnxruntime, our W4A4 (onnxruntime form)", ORT, "ort_w4", None, DYN, False),
    "ort_w6": ("onnxruntime, our W6A6 (onnxruntime form)", ORT, "ort_w6", None, DYN, False),
    "ort_w8": ("onnxruntime, our W8A8 (onnxruntime form)", ORT, "ort_w8", None, DYN, False),
    "ov_float_f32": ("OpenVINO float, f32", OV, "float", "f32", DYN, False),
    "ov_float_bf16": ("OpenVINO float, bf16", OV, "float", "bf16", DYN, False),
    "ov_float_bf16_static": ("OpenVINO float, bf16, compiled for the input's shape", OV, "float", "bf16", STATIC,
                             False),
    "ov_qstatic": ("OpenVINO quantize_static INT8, f32", OV, "qstatic", "f32", DYN, False),
    "ov_w4": ("OpenVINO, our W4A4 (openvino deploy config)", OV, "ov_w4", "f32", None, False),
    "ov_w6": ("OpenVINO, our W6A6 (openvino deploy config)", OV, "ov_w6", "f32", None, False),
    "ov_w8": ("OpenVINO, our W8A8 (openvino deploy config)", OV, "ov_w8", "f32", None, False),
    "ov_w4_noguard": ("OpenVINO, our W4A4 without the NaN guard (experiment)", OV, "ov_w4_noguard", "f32", None,
                      True),
    "ov_w4_table": ("OpenVINO, our W4A4 with the table log-sqrt2 lowering (experiment)", OV, "ov_w4_table", "f32",
                    None, True),
    "ov_w4_dynamic": ("OpenVINO, our W4A4 compiled for dynamic shapes (experiment)", OV, "ov_w4", "f32", DYN,
                      True),
    "ov_w4_bf16": ("OpenVINO bf16, our W4A4 graph (experiment; fails the verdict)", OV, "ov_w4", "bf16", None, True),
    "ov_w8_bf16": ("OpenVINO bf16, our W8A8 graph (experiment)", OV, "ov_w8", "bf16", None, True),
}  # static shapes None: as the OpenVINO deploy config (OV_DEPLOY) says
OURS = {4: ("ort_w4", "ov_w4"), 8: ("ort_w8", "ov_w8")}  # the deployed graphs the goal looks at
GOALS = (("ov_float_bf16", 1.3), ("ov_float_bf16_static", 1.3), ("ort_float", 2.5))
OV_DEPLOY = "instance-seg_openvino_cpu.py"  # one OpenVINO deploy config for every bit width
BITS = (4, 6, 8)
INT8_LAYERS = ("Convolution", "MatMul", "FullyConnected")
INT8_PRECISIONS = ("i8", "u8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.bench_parser(__doc__, "torch threads for export/calibration")
    parser.add_argument("--threads-list", default="1,2", help="inference thread counts (default 1,2)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model first (default 1)")
    parser.add_argument("--no-full-size", action="store_true", help="skip Mask R-CNN Swin-T (random) at --size")
    parser.add_argument("--only-full-size", action="store_true", help="only Mask R-CNN Swin-T at --size")
    parser.add_argument("--experiments", action="store_true", help="also the experiment rows (see above)")
    parser.add_argument("--bits", default="4,6,8", help="our bit widths (W=A), comma-separated (default 4,6,8)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the bundled Mask R-CNN only, --bits 4, "
                        "--threads-list 2, --runs 2, no warm-up, no profile")
    parser.add_argument("--workdir", type=Path, help="where the .onnx files go (default: a temporary folder; "
                        "files already there are reused)")
    parser.add_argument("--no-profile", action="store_true", help="never print the OpenVINO per-layer profile")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.no_full_size, args.only_full_size, args.bits, args.threads_list = True, False, "4", "2"
        args.runs, args.warmup, args.no_profile = 2, 0, True
    return args


def parse_ints(text: str) -> list[int]:
    """'1,2' -> [1, 2] (sorted, unique)."""
    return sorted({int(t) for t in text.split(",") if t.strip()})


# ----------------------------------------------------------------------------- workers


def quant_export_worker(task: dict) -> dict:
    """Calibrate once at task['bits'], then export the onnxruntime form and the OpenVINO form(s)."""
    from repq_export.deploy_config import load_deploy_config
    from repq_export.export.forms import form_for, log_sqrt2_lowering_for, roi_nan_guard_for, unshared_weights_for
    from repq_export.graph_targets import LogSqrt2Lowering
    from repq_export.export.onnx_export import export_onnx
    from repq_export.quant.calibrate import quantize
    from repq_export.resources import DEPLOY_CONFIGS_DIR

    bc.set_threads(task["threads"])
    img, img_hw = bc.bench_image(tuple(task["size"]))
    model = bo.load_detector(task["detector"], task["seed"])
    bits = task["bits"]
    out: dict = {}
    out["calib_s"], model = bc.time_call(lambda: quantize(model, [(img, img_hw)], bits, bits, progress=False))
    ov_deploy = load_deploy_config(DEPLOY_CONFIGS_DIR / OV_DEPLOY)
    ov = dict(form=form_for(ov_deploy), roi_nan_guard=roi_nan_guard_for(ov_deploy),
              log_sqrt2=log_sqrt2_lowering_for(ov_deploy), unshared_weights=unshared_weights_for(ov_deploy))
    jobs = {"ort": dict(form="onnxruntime", target_cpu=task["ort_target_cpu"]), "ov": ov}
    if task.get("noguard"):
        jobs["ov_noguard"] = {**ov, "roi_nan_guard": False}
        jobs["ov_table"] = {**ov, "log_sqrt2": LogSqrt2Lowering.TABLE}
    for key, kwargs in jobs.items():
        out[f"{key}_export_s"], _ = bc.time_call(lambda: export_onnx(model, task["paths"][key], img, img_hw, **kwargs))
    return out


def float_export_worker(task: dict) -> dict:
    """Export the float graph."""
    from repq_export.export.onnx_export import export_onnx
    from repq_export.graph_targets import GraphForm

    bc.set_threads(task["threads"])
    img, img_hw = bc.bench_image(tuple(task["size"]))
    model = bo.load_detector(task["detector"], task["seed"])
    seconds, _ = bc.time_call(lambda: export_onnx(model, task["path"], img, img_hw, form=GraphForm.ONNXRUNTIME))
    return {"export_s": seconds}


def ov_compile(path: str, precision: str, threads: int, profile: bool = False, feeds: dict | None = None):
    """An OpenVINO CPU compiled model with the runner's properties (precision explicit), one stream; with
    `feeds`, compiled for their shapes (as the runner does with static_shapes), else for the graph's."""
    from repq_export.runtime.openvino_runner import compile_config, openvino_core

    config = {**compile_config(precision, threads), "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}
    if profile:
        config["PERF_COUNT"] = "YES"
    core = openvino_core()
    model = core.read_model(path)
    if feeds is not None:
        model.reshape({name: list(value.shape) for name, value in feeds.items()})
    return core.compile_model(model, "CPU", config)


def ov_int8_layers(compiled) -> dict[str, str]:
    """'int8 / all' per layer type of the runtime model's convolutions, matmuls, fully connected."""
    total, int8 = collections.Counter(), collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer not in INT8_LAYERS:
            continue
        total[layer] += 1
        prec = info["runtimePrecision"].astype(str).lower() if "runtimePrecision" in info else ""
        int8[layer] += prec in INT8_PRECISIONS
    return {layer: f"{int8[layer]}/{total[layer]}" for layer in INT8_LAYERS if total[layer]}


def ov_profile(compiled, feeds: dict, runs: int = 2) -> dict[str, float]:
    """Microseconds by 'node type (exec type)' of the last of `runs` profiled inferences."""
    request = compiled.create_infer_request()
    for _ in range(runs):
        request.infer(feeds)
    totals: collections.Counter = collections.Counter()
    for info in request.get_profiling_info():
        if str(info.status).endswith("EXECUTED"):
            totals[f"{info.node_type} ({info.exec_type})"] += info.real_time.total_seconds() * 1e6
    return dict(totals)


def open_model(spec: dict, threads: int, work: Path, feeds: dict):
    """(callable running the feeds, kernel description) of one model."""
    if spec["backend"] == ORT:
        import onnx

        opt = str(work / f"opt_{threads}_{Path(spec['path']).name}")
        sess = bo.session(spec["path"], threads, False, opt)
        ops = collections.Counter(n.op_type for n in onnx.load(opt, load_external_data=False).graph.node)
        kernels = ", ".join(f"{op} {ops[op]}" for op in bo.INTEGER_OPS if ops.get(op)) or "none"
        return (lambda feeds: sess.run(None, feeds)), kernels
    compiled = ov_compile(spec["path"], spec["precision"], threads, feeds=feeds if spec["static"] else None)
    request = compiled.create_infer_request()
    counts = ov_int8_layers(compiled)
    kernels = "int8 " + ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else "none"
    return (lambda feeds: request.infer(feeds)), kernels


def latency_worker(task: dict) -> dict:
    """Open every model (peak RSS growth each), warm up, time round-robin."""
    img, img_hw = bc.bench_image(tuple(task["size"]))
    feeds = {"img": img.numpy(), "img_hw": img_hw.numpy()}
    work, threads = Path(task["workdir"]), task["threads"]
    runs, info = {}, {}
    for name, spec in task["models"].items():
        rss0 = bc.rss_mib()
        bc.reset_peak_rss()
        try:
            fn, kernels = open_model(spec, threads, work, feeds)
            for _ in range(task["warmup"] + 1):
                fn(feeds)
        except Exception as exc:  # noqa: BLE001  a backend refusing a graph is a result, not a crash
            info[name] = {"error": str(exc).splitlines()[0][:120]}
            continue
        runs[name] = fn
        info[name] = {"peak_growth": bc.peak_rss_mib() - rss0, "kernels": kernels, "times": []}
    for _ in range(task["runs"]):
        for name, fn in runs.items():
            info[name]["times"].append(bc.time_call(lambda: fn(feeds))[0])
    for name in runs:
        info[name]["times"] = bc.summarize(info[name]["times"])
    return {"models": info, "peak": bc.peak_rss_mib()}


def profile_worker(task: dict) -> dict:
    """OpenVINO per-layer profile of one model (PERF_COUNT)."""
    img, img_hw = bc.bench_image(tuple(task["size"]))
    feeds = {"img": img.numpy(), "img_hw": img_hw.numpy()}
    compiled = ov_compile(task["path"], task["precision"], task["threads"], profile=True,
                          feeds=feeds if task["static"] else None)
    return {"profile_us": ov_profile(compiled, feeds)}


# ----------------------------------------------------------------------------- production


def produce(name: str, size, args, work: Path) -> tuple[dict, dict]:
    """Every source graph of detector `name`: (files by key, errors by key)."""
    from repq_export.runtime.cpu_features import saturation_free

    base = {"size": list(size), "threads": max(int(t) for t in args.threads_list.split(",")), "seed": args.seed,
            "detector": name}
    files, errors = {}, {}

    def done(key: str, path: Path, result: dict) -> None:
        if "error" in result or not path.exists():
            errors[key] = result.get("error", "not produced")
        else:
            files[key] = str(path)

    def log(what: str) -> None:
        print(f"[bench_cpu] {name}: {what} ...", file=sys.stderr, flush=True)

    path = work / f"{name}_float.onnx"
    if not path.exists():
        log("float graph")
        done("float", path, bc.run_worker({**base, "kind": "float", "path": str(path)}))
    else:
        files["float"] = str(path)
    path = work / f"{name}_qstatic.onnx"
    if "float" in files and not path.exists():
        log("quantize_static")
        done("qstatic", path, bc.run_worker({**base, "kind": "ort_quantize", "float": files["float"],
                                             "pre": str(work / f"{name}_pre.onnx"), "path": str(path)}))
    elif path.exists():
        files["qstatic"] = str(path)
    for bits in parse_ints(args.bits):
        paths = {"ort": work / f"{name}_ort_w{bits}.onnx", "ov": work / f"{name}_ov_w{bits}.onnx"}
        noguard = args.experiments and bits == 4
        if noguard:
            paths["ov_noguard"] = work / f"{name}_ov_w{bits}_noguard.onnx"
            paths["ov_table"] = work / f"{name}_ov_w{bits}_table.onnx"
        if not all(p.exists() for p in paths.values()):
            log(f"W{bits}A{bits}: calibrate, export both forms")
            result = bc.run_worker({**base, "kind": "quant", "bits": bits, "noguard": noguard,
                                    "ort_target_cpu": "vnni" if saturation_free() else "any",
                                    "paths": {k: str(p) for k, p in paths.items()}})
        else:
            result = {}
        for key, p in paths.items():
            done(f"{key}_w{bits}", p, result)
    for key in ("noguard", "table"):
        if f"ov_{key}_w4" in files:
            files[f"ov_w4_{key}"] = files.pop(f"ov_{key}_w4")
    return files, errors


# ----------------------------------------------------------------------------- report


def deploy_static_shapes(variant: str) -> bool:
    """Whether the OpenVINO deploy config our `variant` ('ov_w4...') is exported with compiles for each input shape."""
    from repq_export.deploy_config import load_deploy_config
    from repq_export.resources import DEPLOY_CONFIGS_DIR

    return load_deploy_config(DEPLOY_CONFIGS_DIR / OV_DEPLOY).backend.static_shapes


def model_specs(files: dict, experiments: bool) -> dict[str, dict]:
    """The models to time: variant -> backend, file, precision, static shapes."""
    return {v: {"backend": backend, "path": files[src], "precision": prec,
                "static": deploy_static_shapes(v) if static is None else static}
            for v, (_, backend, src, prec, static, exp) in VARIANTS.items()
            if src in files and (experiments or not exp)}


def detector_table(specs: dict, lat: dict, threads: list[int], errors: dict) -> list[str]:
    """The Markdown table of one detector."""
    top = max(threads)
    med = {v: m["times"]["median"] for v, m in lat[top].get("models", {}).items() if "times" in m}
    rows = []
    for variant, (label, backend, src, *_) in VARIANTS.items():
        if variant not in specs:
            if src in errors:
                rows.append([label, *(["-"] * (len(threads) + 4)), errors[src]])
            continue
        m_top = lat[top].get("models", {}).get(variant, {})
        row = [label]
        for t in threads:
            m = lat[t].get("models", {}).get(variant, {})
            row.append(bc.fmt_times(m["times"], 1000, 0) if "times" in m else m.get("error", "-"))
        for ref in ("ort_float", "ov_float_bf16"):
            row.append(f"{med[ref] / med[variant]:.2f}x" if variant in med and ref in med else "-")
        row.append(f"{m_top['peak_growth']:.0f}" if "peak_growth" in m_top else "-")
        row.append(f"{Path(specs[variant]['path']).stat().st_size / 2**20:.0f}")
        row.append(m_top.get("kernels", m_top.get("error", "-")))
        rows.append(row)
    header = ["model", *[f"ms, {t} thread{'s' * (t > 1)} (min-max)" for t in threads],
              f"speed-up vs onnxruntime float ({top}t)", f"speed-up vs OpenVINO bf16 float ({top}t)",
              "peak RSS growth MiB", "file MiB", "integer kernels that ran"]
    peak = max((lat[t].get("peak", 0) for t in threads), default=0)
    return [bc.markdown_table(header, rows), "",
            f"- peak RSS of a latency process (all {len(specs)} models open): {peak:.0f} MiB", ""]


def goal_lines(lat: dict, top: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The goal verdict lines and, for each missed goal, (candidate variant, reference) to profile."""
    med = {v: m["times"]["median"] for v, m in lat[top].get("models", {}).items() if "times" in m}
    lines, missed = [f"Goal, full size, {top} threads (median ms; speed-up = reference / ours):", ""], []
    for bits, candidates in OURS.items():
        have = [c for c in candidates if c in med]
        if not have:
            lines.append(f"- W{bits}A{bits}: no deployed graph was timed")
            continue
        best = min(have, key=med.get)
        for ref, goal in GOALS:
            if ref not in med:
                lines.append(f"- W{bits}A{bits}: {VARIANTS[ref][0]} not timed")
                continue
            ratio = med[ref] / med[best]
            verdict = "MET" if ratio >= goal else "MISSED"
            lines.append(f"- W{bits}A{bits} best = {VARIANTS[best][0]} {med[best] * 1000:.0f} ms vs "
                         f"{VARIANTS[ref][0]} {med[ref] * 1000:.0f} ms: {ratio:.2f}x (goal >= {goal}x) {verdict}")
            if ratio < goal:
                missed.append((best, ref))
    return lines + [""], missed


def profile_lines(variant: str, ref: str, prof: dict, ref_prof: dict | None) -> list[str]:
    """Which op types hold `variant` back: its top per-layer times (and the reference's)."""
    total = sum(prof.values()) or 1.0
    by_type: collections.Counter = collections.Counter()
    for key, us in prof.items():
        by_type[key.split(" (")[0]] += us
    rows = []
    for key, us in sorted(prof.items(), key=lambda kv: -kv[1])[:12]:
        rows.append([key, f"{us / 1000:.1f}", f"{100 * us / total:.1f}%"])
    lines = [f"OpenVINO per-layer profile of {VARIANTS[variant][0]} (PERF_COUNT, one inference, "
             f"{total / 1000:.0f} ms summed over layers), top node types (exec type):", "",
             bc.markdown_table(["node type (exec type)", "ms", "share"], rows), "",
             "By node type: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in by_type.most_common(8)), ""]
    if ref_prof:
        rtot = sum(ref_prof.values()) or 1.0
        rtype: collections.Counter = collections.Counter()
        for key, us in ref_prof.items():
            rtype[key.split(" (")[0]] += us
        lines += [f"{VARIANTS[ref][0]} by node type ({rtot / 1000:.0f} ms summed): " +
                  ", ".join(f"{k} {v / 1000:.0f} ms" for k, v in rtype.most_common(8)),
                  f"{VARIANTS[variant][0]} by node type: " +
                  ", ".join(f"{k} {v / 1000:.0f} ms" for k, v in by_type.most_common(8)), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        task = json.loads(args.worker)
        fn = {"float": float_export_worker, "quant": quant_export_worker, "ort_quantize": bo.ort_quantize_worker,
              "latency": latency_worker, "profile": profile_worker}[task["kind"]]
        bc.emit_result(fn(task))
        return 0
    threads = parse_ints(args.threads_list)
    if args.runs < 1 or args.warmup < 0 or min(threads) < 1 or not set(parse_ints(args.bits)) <= set(BITS):
        print("error: --runs and --threads-list values must be >= 1, --warmup >= 0, --bits from 4,6,8",
              file=sys.stderr)
        return 2
    import openvino

    full = "mask_rcnn_swin_t"
    bundled = bo.BUNDLED[:1] if args.quick else bo.BUNDLED
    names = [full] if args.only_full_size else [*bundled, *([] if args.no_full_size else [full])]
    start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_cpu_"))
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    lines = ["## CPU latency: onnxruntime and OpenVINO, float, quantize_static and our W4A4 / W6A6 / W8A8", "",
             *bc.machine_lines(max(threads)),
             f"- CPU flags: {bc.cpu_flags(('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_int8'))}"
             f"; OpenVINO {openvino.__version__}", ""]
    try:
        for name in names:
            size = args.size if name == full else bo.DETECTORS[name][2]
            files, errors = produce(name, size, args, work)
            specs = model_specs(files, args.experiments)
            lat = {}
            for t in threads:
                print(f"[bench_cpu] {name}: latency, {t} thread(s) ...", file=sys.stderr, flush=True)
                lat[t] = bc.run_worker({"kind": "latency", "size": list(size), "threads": t, "models": specs,
                                        "workdir": str(work), "runs": args.runs, "warmup": args.warmup})
            hp, wp = (-(-v // 32) * 32 for v in size)
            lines += [f"### {name}, image {size[0]}x{size[1]} (padded {hp}x{wp})", "",
                      *detector_table(specs, lat, threads, errors)]
            if name == full:
                goal, missed = goal_lines(lat, max(threads))
                lines += goal
                profiled: dict[str, dict] = {}
                for variant, ref in [] if args.no_profile else missed:
                    for v in (variant, ref):
                        if v not in profiled and VARIANTS[v][1] == OV and v in specs:
                            print(f"[bench_cpu] profile {v} ...", file=sys.stderr, flush=True)
                            profiled[v] = bc.run_worker({"kind": "profile", "size": list(size),
                                                         "threads": max(threads), "path": specs[v]["path"],
                                                         "precision": specs[v]["precision"],
                                                         "static": specs[v]["static"]}).get("profile_us", {})
                    if profiled.get(variant) and (variant, ref) == next(m for m in missed if m[0] == variant):
                        refs = [r for v, r in missed if v == variant and profiled.get(r)]
                        lines += profile_lines(variant, refs[0] if refs else ref, profiled[variant],
                                               profiled.get(refs[0]) if refs else None)
        load1 = os.getloadavg()
        lines += [f"Median of {args.runs} round-robin rounds after {args.warmup} warm-up run(s); OpenVINO with one "
                  "stream, PERFORMANCE_HINT LATENCY, INFERENCE_NUM_THREADS = the thread count; onnxruntime with "
                  "repq-export's session options. Load average at start "
                  f"{load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}, at end {load1[0]:.2f} / {load1[1]:.2f} / "
                  f"{load1[2]:.2f}; total wall time {time.perf_counter() - start:.0f} s.", "",
                  "Command: `" + bc.command_line() + "`"]
        print("\n".join(lines))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
