"""`repq-export serve`: the artifact's runner behind a real Triton Inference Server, through PyTriton.

Triton owns the network side (HTTP and gRPC endpoints, health and readiness, metrics, the request
queue and dynamic batching); each model instance is one runner with the project's host-side
pre- and post-processing, so a served detection is the in-process one, bit for bit.
"""

from __future__ import annotations

import os
import signal
import sys
import sysconfig
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..artifact.artifact_file import Artifact
from ..data.postprocess import postprocess
from ..data.transforms import preprocess
from ..errors import UserError
from ..runtime.build import RunnerSettings, runner_for
from . import codec


START_ATTEMPTS = 2  # PyTriton's model handshake fails now and then on a loaded machine; a second start works


@dataclass
class ServeOptions:
    """Where and how the server listens and runs."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1  # model instances: requests run concurrently on this many runners
    max_batch_size: int = 1  # > 1 turns on Triton's dynamic batcher (requests grouped per call)
    max_queue_delay_us: int = 0  # how long the batcher waits to fill a batch
    backend: str = "ort"  # ort (onnxruntime) or trt (the artifact's TensorRT engine)
    threads: int = 0  # onnxruntime intra-op threads per instance (0: onnxruntime's default)
    max_image_bytes: int = codec.MAX_IMAGE_BYTES
    max_pixels: int = codec.MAX_PIXELS
    exit_timeout_s: int = 5  # on shutdown, how long in-flight requests may finish


def check_serving_stack() -> None:
    """Refuse early, in one line, where the [serve] extra is missing or cannot work."""
    try:
        import pytriton  # noqa: F401
        import tritonclient  # noqa: F401
    except ImportError as exc:
        raise UserError(f"serving needs the [serve] extra ({exc.name} is not installed): "
                        "pip install 'repq-export[serve]'") from None
    if int(np.__version__.split(".")[0]) >= 2:
        # PyTriton 0.7's Python-backend stub reads numpy 2 arrays wrongly (every tensor arrives as
        # its first element repeated); PyTriton itself requires numpy<2 for that reason
        raise UserError(f"serving needs numpy<2 (PyTriton's Python backend), found numpy {np.__version__}: "
                        "pip install 'repq-export[serve]' into its own environment")


def python_backend_env() -> None:
    """Let Triton's Python-backend stub load this interpreter's libpython, not the system's.

    The stub is linked against a libpython by name; under a Python built outside the system
    (pyenv, conda) the system's copy is found first and the stub dies at start. The server process
    inherits this environment.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *paths])


class DetectionModel:
    """One model instance: a runner and the host-side steps around it, called by PyTriton per batch."""

    def __init__(self, runner, settings, classes, options: ServeOptions) -> None:
        self.runner, self.settings, self.classes, self.options = runner, settings, classes, options

    def detect(self, request: dict) -> dict[str, np.ndarray]:
        """One request's tensors in, its response's tensors out; BadRequest for what cannot be served."""
        if codec.IMAGE not in request:
            raise codec.BadRequest(f"no '{codec.IMAGE}' input")
        img = codec.decode_image(np.asarray(request[codec.IMAGE]), self.options.max_image_bytes,
                                 self.options.max_pixels)
        thr = codec.score_threshold(request)
        try:
            prep = preprocess(img, **vars(self.settings))
        except (ValueError, UserError) as exc:  # a 1-pixel-high image shrinks to nothing, or misses a static size
            raise codec.BadRequest(str(exc)) from None
        dets = postprocess(*self.runner(prep.tensor, prep.img_hw_tensor), prep)
        return codec.encode_response(dets, self.classes, thr, prep.ori_hw)

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        return [self.detect(dict(r)) for r in requests]


def model_instances(artifact: Artifact, options: ServeOptions) -> list[DetectionModel]:
    """`options.instances` independent runners over the opened artifact."""
    from ..runtime.ort_runner import OrtRunner

    if options.backend not in ("ort", "trt"):
        raise UserError(f"--backend {options.backend}: choose ort or trt")
    models = []
    for _ in range(options.instances):
        if options.backend == "ort":
            runner = OrtRunner(artifact.onnx_path, threads=options.threads)
        else:
            runner = runner_for("trt", artifact, RunnerSettings(device="cuda"))
        models.append(DetectionModel(runner, artifact.preprocess, artifact.classes, options))
    return models


def tensor_specs():
    """The model's inputs and outputs as PyTriton declares them (Triton adds the batch dimension)."""
    from pytriton.model_config import Tensor

    inputs = [Tensor(name=codec.IMAGE, dtype=np.uint8, shape=(-1,)),
              Tensor(name=codec.SCORE_THR, dtype=np.float32, shape=(1,), optional=True)]
    outputs = [Tensor(name=codec.BOXES, dtype=np.float32, shape=(-1, 4)),
               Tensor(name=codec.SCORES, dtype=np.float32, shape=(-1,)),
               Tensor(name=codec.LABELS, dtype=np.int64, shape=(-1,)),
               Tensor(name=codec.CLASS_NAMES, dtype=np.bytes_, shape=(-1,)),
               Tensor(name=codec.MASKS, dtype=np.bytes_, shape=(-1,)),
               Tensor(name=codec.IMAGE_SIZE, dtype=np.int64, shape=(2,))]
    return inputs, outputs


def start_server(artifact: Artifact, options: ServeOptions, log: Callable[[str], None] = print):
    """Load the runners, start Triton with the model bound, return once it is ready (a pytriton Triton)."""
    check_serving_stack()
    if options.max_batch_size < 1 or options.instances < 1:
        raise UserError("--instances and --max-batch-size must be at least 1")
    models = model_instances(artifact, options)
    python_backend_env()
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(http_address=options.host, http_port=options.http_port, grpc_address=options.host,
                          grpc_port=options.grpc_port, metrics_port=options.metrics_port,
                          exit_timeout_secs=options.exit_timeout_s, log_verbose=0)
    inputs, outputs = tensor_specs()
    batcher = DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us)
    for attempt in range(START_ATTEMPTS):
        triton = Triton(config=config)
        triton.bind(model_name=codec.MODEL_NAME, infer_func=models, inputs=inputs, outputs=outputs,
                    config=ModelConfig(max_batch_size=options.max_batch_size, batcher=batcher), strict=True)
        try:
            triton.run()
            break
        except Exception as exc:  # a port in use, the server binary failing, PyTriton's handshake failing
            from .client import error_reason

            triton.stop()
            reason = error_reason(exc)
            if attempt + 1 == START_ATTEMPTS or "load failed" not in str(exc):
                raise UserError(f"Triton did not start ({reason}); are ports {options.http_port}/"
                                f"{options.grpc_port}/{options.metrics_port} free?") from None
            log(f"Triton could not load the model ({reason}); starting it again")
    log(f"serving {artifact.path} as model '{codec.MODEL_NAME}' ({options.backend}, {artifact.precision}, "
        f"{options.instances} instance(s), max batch {options.max_batch_size}): "
        f"http://{options.host}:{options.http_port}  grpc://{options.host}:{options.grpc_port}  "
        f"metrics :{options.metrics_port}")
    return triton


def serve_until_signal(triton, log: Callable[[str], None] = print) -> int:
    """Block until SIGINT or SIGTERM (or the server dies), then stop Triton cleanly."""
    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum, _frame) -> None:
        caught.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            if not triton.is_alive():
                log("error: the Triton server stopped by itself")
                triton.stop()
                return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log(f"{signal.Signals(caught[0]).name} received: stopping the server")
    triton.stop()
    log("stopped")
    sys.stdout.flush()
    return 0
