#!/usr/bin/env python
"""Forward wall time and peak memory of the full-size detectors (random weights) on this CPU.

    python tools/bench_forward.py                       # Mask R-CNN Swin-T, Cascade Swin-S, Swin-T W4A4
    python tools/bench_forward.py --size 480x640 --runs 5 --variants swin_t_float swin_t_w4a4

Variants (each in its own process, one after the other, in one run):
  swin_t_float    Mask R-CNN Swin-T, float
  cascade_s_float Cascade Mask R-CNN Swin-S, float
  swin_t_w4a4     Mask R-CNN Swin-T, RepQ-ViT W4A4 fake quant (calibrated on the same image first)
Time: median of --runs forwards after --warmup forwards (torch.inference_mode). Memory: RSS high-
water mark over the warm-up and timed forwards (VmHWM, reset after the model is built and, for
fake quant, calibrated), next to the RSS before the first forward. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import bench_common as bc

VARIANTS = {
    "swin_t_float": ("mask_rcnn_swin_t", "Mask R-CNN Swin-T", None),
    "cascade_s_float": ("cascade_swin_s", "Cascade Mask R-CNN Swin-S", None),
    "swin_t_w4a4": ("mask_rcnn_swin_t", "Mask R-CNN Swin-T", 4),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.bench_parser(__doc__, "torch intra-op threads")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="what to run (default: all three)")
    parser.add_argument("--runs", type=int, default=3, help="timed forwards per variant (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards first (default 1)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(task: dict) -> dict:
    """Build one variant, run it, and measure (runs in its own process)."""
    import torch

    from repq_export.quant.calibrate import quantize

    bc.set_threads(task["threads"])
    arch, _, bits = VARIANTS[task["variant"]]
    img, img_hw = bc.bench_image(tuple(task["size"]))
    t_build, model = bc.time_call(lambda: bc.random_detector(arch, task["seed"]))
    params = bc.param_count_m(model)
    t_calib = None
    if bits is not None:
        t_calib, model = bc.time_call(lambda: quantize(model, [(img, img_hw)], bits, bits, progress=False))
    rss_before = bc.rss_mib()
    peak_reset = bc.reset_peak_rss()
    times, first, n_det = [], None, None
    with torch.inference_mode():
        for i in range(task["warmup"] + task["runs"]):
            dt, out = bc.time_call(lambda: model(img, img_hw))
            first = dt if first is None else first
            n_det = int(out[0].shape[0])
            if i >= task["warmup"]:
                times.append(dt)
    return {"variant": task["variant"], "params_m": params, "build_s": t_build, "calib_s": t_calib,
            "load": os.getloadavg()[0],
            "first_s": first, "times": bc.summarize(times), "n_det": n_det, "rss_before": rss_before,
            "peak": bc.peak_rss_mib(), "peak_reset": peak_reset, "input": list(img.shape[2:])}


def report(args: argparse.Namespace, results: list[dict], wall: float) -> str:
    """The Markdown report: machine, table, notes."""
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["task"]["variant"], "-", "-", "-", r["error"], "-", "-", "-", "-", "-"])
            continue
        _, name, bits = VARIANTS[r["variant"]]
        mode = "float" if bits is None else f"W{bits}A{bits} fake quant"
        rows.append([name, mode, f"{r['params_m']:.1f}", "x".join(map(str, r["input"])),
                     bc.fmt_times(r["times"]), f"{r['first_s']:.2f}", r["n_det"],
                     f"{r['rss_before']:.0f}", f"{r['peak']:.0f}", f"{r['load']:.1f}"])
    base = next((r for r in results if r.get("variant") == "swin_t_float"), None)
    quant = next((r for r in results if r.get("variant") == "swin_t_w4a4"), None)
    peak_kind = ("VmHWM, reset after build/calibration" if all(r.get("peak_reset", False) for r in results)
                 else "process-lifetime ru_maxrss (clear_refs not permitted)")
    lines = [
        f"## Forward time and peak memory at {args.size[0]}x{args.size[1]} (padded "
        f"{'x'.join(map(str, results[0].get('input', ['?', '?'])))}), random weights",
        "",
        *bc.machine_lines(args.threads),
        "",
        bc.markdown_table(
            ["model", "mode", "params (M)", "input", f"forward s, median of {args.runs} (min-max)",
             "first forward s", "detections", "RSS before forward (MiB)", "peak RSS (MiB)",
             "load avg after"], rows),
        "",
        f"- each variant in a fresh process, {args.warmup} warm-up forward(s) then {args.runs} timed, "
        "`torch.inference_mode()`; peak RSS = " + peak_kind + ", i.e. the whole process (Python, torch, "
        "weights and the forward's working memory); the forward's own share is peak minus 'before'.",
        "- random weights with three classes' logits raised by 6, so every forward returns 100 "
        "detections and the mask head runs on them (as on a real image).",
        "- load avg after = the machine's 1-minute load average when the variant finished (this "
        "process counts about 1 of it): other jobs' load changes between variants skew the ratios.",
    ]
    if base and quant and "error" not in base and "error" not in quant:
        ratio = quant["times"]["median"] / base["times"]["median"]
        lines.append(f"- fake quant W4A4 / float (Mask R-CNN Swin-T): {ratio:.2f}x the float forward time; "
                     f"its calibration in the same process took {quant['calib_s']:.1f} s (not timed above).")
    lines += [f"- total wall time of this run: {wall:.0f} s", "", "Command: `" + bc.command_line() + "`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        bc.emit_result(worker(json.loads(args.worker)))
        return 0
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        print("error: --runs and --threads must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = []
    for variant in args.variants:
        print(f"[bench_forward] {variant} ...", file=sys.stderr, flush=True)
        task = {"variant": variant, "size": list(args.size), "runs": args.runs, "warmup": args.warmup,
                "threads": args.threads, "seed": args.seed}
        results.append(bc.run_worker(task))
    print(report(args, results, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
