#!/usr/bin/env python
"""OpenVINO latency of given ONNX graphs side by side: one process, every graph once per round in turn.

    python tools/bench_openvino_graphs.py --workdir DIR NAME=FILE[@f32|@bf16][:static] ... [--runs 5] [--profile]

FILE is relative to --workdir (e.g. tools/bench_cpu.py's); ':static' compiles it for the input's shape (as the
runner does with the deploy config's static_shapes), else for the graph's dynamic shapes. The input is
bench_common's synthetic image at --size. Prints a Markdown table (median and min-max ms, speed-up against
the first graph) and, with --profile, each graph's PERF_COUNT time by node type (one inference).
"""

from __future__ import annotations

import collections
import os
import sys
import time
from pathlib import Path

import bench_common as bc
from bench_cpu import ov_compile, ov_int8_layers, ov_profile


def parse_graph(text: str, workdir: Path) -> tuple[str, str, str, bool]:
    """'name=file@bf16:static' -> (name, path, precision, static)."""
    name, _, spec = text.partition("=")
    static = spec.endswith(":static")
    path, _, precision = spec.removesuffix(":static").partition("@")
    return name, str(workdir / path), precision or "f32", static


def main(argv: list[str] | None = None) -> int:
    parser = bc.bench_parser(__doc__, "OpenVINO inference threads")
    parser.add_argument("graphs", nargs="+", help="NAME=FILE[@f32|@bf16][:static]")
    parser.add_argument("--workdir", type=Path, default=Path("."), help="folder the FILEs are in")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--profile", action="store_true", help="also the per-layer time by node type")
    args = parser.parse_args(argv)
    img, img_hw = bc.bench_image(tuple(args.size))
    feeds = {"img": img.numpy(), "img_hw": img_hw.numpy()}
    load0 = os.getloadavg()
    graphs = [parse_graph(g, args.workdir) for g in args.graphs]
    compiled_by_name, requests, kernels, times = {}, {}, {}, {}
    for name, path, precision, static in graphs:
        compiled = ov_compile(path, precision, args.threads, profile=args.profile, feeds=feeds if static else None)
        compiled_by_name[name], requests[name] = compiled, compiled.create_infer_request()
        kernels[name] = ", ".join(f"{k} {v}" for k, v in ov_int8_layers(compiled).items())
        requests[name].infer(feeds)  # warm-up
        times[name] = []
    for _ in range(args.runs):
        for name in requests:
            start = time.perf_counter()
            requests[name].infer(feeds)
            times[name].append(time.perf_counter() - start)
    first = graphs[0][0]
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    rows = [[f"{name} ({Path(path).name}, {precision}, {'static' if static else 'dynamic'} shapes)",
             f"{med[name] * 1000:.0f} ({min(times[name]) * 1000:.0f}-{max(times[name]) * 1000:.0f})",
             f"{med[first] / med[name]:.2f}x", kernels[name]] for name, path, precision, static in graphs]
    load1 = os.getloadavg()
    print("\n".join([*bc.machine_lines(args.threads), "",
                     bc.markdown_table(["graph", f"ms, {args.threads} threads (min-max)", f"speed-up vs {first}",
                                        "int8 kernels"], rows), "",
                     f"Median of {args.runs} round-robin rounds after one warm-up run; load average at start "
                     f"{load0[0]:.2f}, at end {load1[0]:.2f}.", "", "Command: `" + bc.command_line() + "`"]))
    if args.profile:
        for name in requests:
            by_type: collections.Counter = collections.Counter()
            for key, us in ov_profile(compiled_by_name[name], feeds, runs=1).items():
                by_type[key] += us
            total = sum(by_type.values()) / 1000
            print(f"\n{name}: {total:.0f} ms summed over layers; " +
                  ", ".join(f"{k} {v / 1000:.0f}" for k, v in by_type.most_common(10)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
