"""`repq-export serve | infer | triton-repo`: serve an artifact from Triton, ask it, or write a native
Triton model repository for production."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .common import CommandParser, fraction, max_pixels_option, non_negative_int, positive_int, positive_number

MAX_LISTED = 20


def port(text: str) -> int:
    """A TCP port number."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1..65535)")
    return value


def serve_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="repq-export serve", description="Serve an artifact from a Triton Inference Server "
                      "(PyTriton): a request is one encoded image (JPEG/PNG bytes) and optionally a score "
                      "threshold; the response is boxes in original-image pixels, scores, labels, class names "
                      "and masks as COCO RLE. Stops cleanly on Ctrl-C or SIGTERM. Needs the [serve] extra.")
    p.add_argument("artifact", type=Path, help="artifact directory (model.onnx, quant.pth, repq.json)")
    p.add_argument("--backend", choices=("ort", "trt"), default="ort", help="ort: the ONNX graph in onnxruntime "
                   "(default); trt: the artifact's TensorRT engine")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for "
                   "every interface)")
    p.add_argument("--http-port", type=port, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=port, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=port, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--instances", type=positive_int, default=1, help="model instances: requests run "
                   "concurrently on this many runners (default 1)")
    p.add_argument("--max-batch-size", type=positive_int, default=1, help="above 1, Triton's dynamic batcher "
                   "groups up to this many requests per call (default 1: each request alone; a refused request "
                   "fails the requests batched with it)")
    p.add_argument("--max-queue-delay-us", type=non_negative_int, default=0, help="how long the batcher waits to fill a "
                   "batch, in microseconds (default 0)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="onnxruntime threads per instance (default: "
                   "onnxruntime's choice)")
    p.add_argument("--max-image-mb", type=positive_number, default=32, help="refuse encoded images larger than this (default 32)")
    max_pixels_option(p, "image sent")
    return p


def run_serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    from ..artifact.artifact_file import Artifact
    from ..serving.server import ServeOptions, check_serving_stack, serve_until_signal, start_server

    options = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, instances=args.instances,
                           max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                           backend=args.backend, threads=args.threads,
                           max_image_bytes=int(args.max_image_mb * 1024 * 1024), max_pixels=args.max_pixels)
    check_serving_stack()  # before the artifact: a missing extra is said first, as before any work
    triton = start_server(Artifact.open(args.artifact), options, log=lambda m: print(m, flush=True))
    return serve_until_signal(triton, log=lambda m: print(m, flush=True))


def infer_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="repq-export infer", description="Send one image to a `repq-export serve` server "
                      "and save a picture of the detections it returns (as `predict` draws them).")
    p.add_argument("url", help="the server: http://HOST:PORT or grpc://HOST:PORT")
    p.add_argument("image", type=Path, help="image file (JPEG, PNG, anything OpenCV reads)")
    p.add_argument("--save", type=Path, help="picture to write, .png or .jpg (default: <image name>_pred.png)")
    p.add_argument("--score-thr", type=fraction, default=0.3, help="ask for detections scoring at least this "
                   "(default 0.3)")
    p.add_argument("--timeout", type=positive_number, default=60.0, help="seconds to wait for the server (default 60)")
    max_pixels_option(p)
    return p


def run_infer(argv: list[str]) -> int:
    args = infer_parser().parse_args(argv)
    from ..data.images import read_image
    from ..evaluation.visualize import draw_detections, write_image
    from ..serving.client import DetectionClient, ServerError
    from .predict import save_path

    out = save_path(args)
    img = read_image(args.image, args.max_pixels)
    with DetectionClient(args.url, timeout_s=args.timeout) as client:
        if not client.ready():
            raise UserError(f"{args.url}: no ready repq-export server there")
        try:
            dets = client.detect(args.image.read_bytes(), args.score_thr)
        except (ServerError, ValueError) as exc:
            raise UserError(f"{args.url}: the server refused {args.image} ({exc})") from None
    names: list[str] = []
    for label, name in zip(dets.labels.tolist(), dets.class_names):
        names += [f"class {len(names) + k}" for k in range(label + 1 - len(names))]
        names[label] = name
    write_image(out, draw_detections(img, dets.as_detections(), names, args.score_thr))
    print(f"wrote {out}: {len(dets)} detections with score >= {args.score_thr:g} from {args.url}")
    for i in dets.scores.argsort(kind="stable")[::-1][:MAX_LISTED]:
        box = ", ".join(f"{v:.1f}" for v in dets.boxes[i])
        print(f"  {dets.class_names[i]:<16} {dets.scores[i]:.3f}  [{box}]")
    if len(dets) > MAX_LISTED:
        print(f"  ... and {len(dets) - MAX_LISTED} more")
    return 0


def triton_repo_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="repq-export triton-repo", description="Write a native Triton model repository for "
                      "an artifact: the ONNX graph under Triton's onnxruntime backend (and the TensorRT engine, "
                      "where built, under its TensorRT backend), pre- and post-processing as Python models, and "
                      "an ensemble that chains them; every config.pbtxt is checked against Triton's ModelConfig.")
    p.add_argument("artifact", type=Path, help="artifact directory")
    p.add_argument("out", type=Path, help="model repository folder to write (must not exist, or use --force)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--instances", type=positive_int, default=1, help="instances of each model (default 1)")
    p.add_argument("--kind", choices=("cpu", "gpu"), default="cpu", help="instance kind of the network model "
                   "(default cpu)")
    return p


def run_triton_repo(argv: list[str]) -> int:
    args = triton_repo_parser().parse_args(argv)
    from ..artifact.artifact_file import Artifact
    from ..serving.repo_check import schema
    from ..serving.triton_repo import write_model_repository

    schema()  # before the artifact: a missing extra is said first, as before any work
    written = write_model_repository(Artifact.open(args.artifact), args.out, force=args.force,
                                     instances=args.instances, kind=args.kind)
    print(f"wrote Triton model repository {args.out}: {', '.join(written)}")
    return 0
