#!/usr/bin/env python
"""Load benchmark of `repq-export serve` on loopback against the in-process runner.

    python tools/bench_serving.py [--artifact DIR] [--clients 1 4] [--requests 40] [--max-seconds 300]

Starts a Triton server (PyTriton) over the artifact on free loopback ports, then for each client count
sends a fixed number of requests (the artifact's synthetic test images, in turn) from that many threads,
each with its own connection, and measures every request's latency. The in-process rows (before the
server rows and again after them) run the same requests one after another through the same runner
path (decode, preprocess, onnxruntime, postprocess) without a server. Every served response is compared
with the in-process detections of its image; a difference counts as an error. Each image is sent once
(twice to the server) before timing. Bounded: at most --requests per row and --max-seconds in all.
Without --artifact a tiny random-weight artifact is exported first (about half a minute).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def tiny_artifact(root: Path) -> tuple[Path, list[Path]]:
    """Export a tiny random-weight W4A4 artifact and a few synthetic test images under `root`."""
    from repq_export.data.synthetic import make_synthetic_coco
    from repq_export.export.artifact import ExportRequest, export_artifact
    from repq_export.config_source import load_config
    from repq_export.models.random_checkpoint import make_random_checkpoint, save_checkpoint

    config = REPO / "configs/tiny/mask_rcnn_tiny.py"
    save_checkpoint(make_random_checkpoint(load_config(config), seed=0), root / "tiny.pth")
    make_synthetic_coco(root / "coco", "val", num_images=4, seed=7)
    images = sorted((root / "coco/val").glob("*.png"))
    req = ExportRequest(ckpt=root / "tiny.pth", out=root / "artifact", w_bits=4, a_bits=4, config=config,
                        calib_paths=images[:1], accept_accuracy_loss=True)  # a random model: no accuracy to check
    return export_artifact(req, progress=False, log=lambda _: None), images


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def same(served, dets) -> bool:
    return (np.array_equal(served.boxes, dets.boxes) and np.array_equal(served.scores, dets.scores)
            and [m["counts"] for m in served.masks] == [m["counts"] for m in dets.masks])


def in_process_row(runner, settings, payloads: list[bytes], requests: int, deadline: float):
    """Requests one after another through the runner path, no server: (latencies s, wall s, detections)."""
    from repq_export.data.postprocess import postprocess
    from repq_export.data.transforms import preprocess
    from repq_export.serving.codec import decode_image

    latencies, expected = [], {}
    for data in payloads:  # warm-up, not timed (onnxruntime's first runs at a new size are slower)
        prep = preprocess(decode_image(np.frombuffer(data, np.uint8)[None]), **vars(settings))
        runner(prep.tensor, prep.img_hw_tensor)
    start = time.perf_counter()
    for i in range(requests):
        if time.perf_counter() > deadline:
            break
        t = time.perf_counter()
        img = decode_image(np.frombuffer(payloads[i % len(payloads)], np.uint8)[None])
        prep = preprocess(img, **vars(settings))
        expected.setdefault(i % len(payloads), postprocess(*runner(prep.tensor, prep.img_hw_tensor), prep))
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - start, expected


def served_row(url: str, payloads: list[bytes], expected: dict, clients: int, requests: int, deadline: float):
    """`requests` requests from `clients` threads: (latencies s, wall s, errors)."""
    from repq_export.serving.client import DetectionClient

    lock, counter, latencies, errors = threading.Lock(), iter(range(requests)), [], []

    def worker() -> None:
        with DetectionClient(url) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                try:
                    served = client.detect(payloads[i % len(payloads)])
                    ok = same(served, expected[i % len(payloads)])
                except Exception as exc:  # counted, not raised: the benchmark reports errors
                    ok, served = False, exc
                with lock:
                    latencies.append(time.perf_counter() - t)
                    if not ok:
                        errors.append(served)

    with DetectionClient(url) as client:  # warm-up of both instances, not timed
        for data in payloads * 2:
            client.detect(data)
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start, errors


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, help="artifact directory (default: export a tiny one)")
    p.add_argument("--images", type=Path, nargs="*", help="request images (default: the tiny artifact's)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent clients per row (default 1 4)")
    p.add_argument("--requests", type=int, default=40, help="requests per row (default 40)")
    p.add_argument("--instances", type=int, default=2, help="server model instances (default 2)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per runner and torch threads "
                   "(default 1)")
    p.add_argument("--max-seconds", type=float, default=300, help="stop every row after this long in all (default 300)")
    args = p.parse_args()
    import torch
    from bench_common import machine_lines

    torch.set_num_threads(args.threads)  # the host-side torch work (mask pasting) of the in-process row

    from repq_export.artifact.artifact_file import Artifact
    from repq_export.runtime.ort_runner import OrtRunner
    from repq_export.serving.server import ServeOptions, start_server

    with tempfile.TemporaryDirectory() as tmp:
        if args.artifact:
            artifact, images = args.artifact, list(args.images or [])
            if not images:
                p.error("--images is needed with --artifact")
        else:
            artifact, images = tiny_artifact(Path(tmp))
        payloads = [path.read_bytes() for path in images]
        opened = Artifact.open(artifact)
        settings = opened.preprocess
        deadline = time.perf_counter() + args.max_seconds
        runner = OrtRunner(opened.onnx_path, threads=args.threads)
        rows = [("in-process runner", 1, *in_process_row(runner, settings, payloads, args.requests, deadline))]
        expected = rows[0][4]
        rows[0] = rows[0][:4] + ([],)
        http, grpc, metrics = free_ports(3)
        triton = start_server(opened, ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics,
                                                     instances=args.instances, threads=args.threads), log=lambda _: None)
        try:
            for clients in args.clients:
                lat, wall, errors = served_row(f"http://127.0.0.1:{http}", payloads, expected, clients,
                                               args.requests, deadline)
                rows.append((f"served (HTTP, {args.instances} instances)", clients, lat, wall, errors))
        finally:
            triton.stop()
        # again after the server rows: the difference between the two in-process rows is the machine's noise
        lat, wall, _ = in_process_row(runner, settings, payloads, args.requests, deadline)
        rows.append(("in-process runner, again", 1, lat, wall, []))
    print(f"# bench_serving: `python tools/bench_serving.py {' '.join(sys.argv[1:])}`\n")
    print("\n".join(machine_lines(args.threads)) + "\n")
    print("| path | clients | requests | errors | p50 ms | p99 ms | throughput req/s |")
    print("|---|---|---|---|---|---|---|")
    for name, clients, lat, wall, errors in rows:
        print(f"| {name} | {clients} | {len(lat)} | {len(errors)} | {percentile(lat, 50) * 1e3:.1f} | "
              f"{percentile(lat, 99) * 1e3:.1f} | {len(lat) / wall:.2f} |")
    for name, _, _, _, errors in rows:
        for err in errors[:3]:
            print(f"- {name}: {err!r:.200}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
