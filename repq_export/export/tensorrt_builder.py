"""Build a TensorRT engine from the exported QDQ ONNX graph, as a deploy config says.

INT8 is explicit: it comes from the graph's QuantizeLinear/DequantizeLinear nodes, never from
calibration (TensorRT 11 removed calibrators and the INT8 flag). The float parts run in FP32,
or in FP16 where the deploy config asks and the TensorRT version still has the FP16 builder
flag (10.x; 11.x only builds strongly typed networks). The network is created without
STRONGLY_TYPED on 10.x so that flag can apply.

``tensorrt`` is imported only inside functions: this module imports (and its errors read
well) on machines without TensorRT or a GPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from repq_export.deploy_config import DeployConfig, TensorRTConfig
from repq_export.errors import UserError
from repq_export.files import write_atomically
from repq_export.runtime.tensorrt_support import tensorrt_available

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def build_engine(onnx_path: str | Path, engine_path: str | Path, deploy_cfg: DeployConfig,
                 timing_cache: str | Path | None = None, log: Log = _stderr) -> Path:
    """Parse ``onnx_path``, build a serialized engine and write it to ``engine_path``.

    ``timing_cache``: a file to load tactic timings from (if it exists) and save them to
    after the build, which makes rebuilds of the same graph on the same GPU much faster.
    The engine is written to a temporary name and renamed, so a failed build leaves nothing.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    backend = deploy_cfg.backend
    if not isinstance(backend, TensorRTConfig):
        raise UserError(f"{deploy_cfg.path}: backend_config.type: is '{backend.type}'; a TensorRT "
                        "engine needs a deploy config with type='tensorrt'")
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: no such ONNX file")
    available, why = tensorrt_available()
    if not available:
        raise UserError(f"{engine_path}: cannot build a TensorRT engine: {why}")
    import tensorrt as trt

    logger = _make_logger(trt, log)
    trt.init_libnvinfer_plugins(logger, "")  # RoiAlign is imported as the ROIAlign_TRT plugin
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10+
    parser = _parse(trt, network, logger, onnx_path, log)  # owns the weights: keep it until built
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, backend.max_workspace_size)
    _set_precision(trt, network, config, deploy_cfg, log)
    config.add_optimization_profile(_profile(builder, network, deploy_cfg))
    cache_path = Path(timing_cache) if timing_cache is not None else None
    _load_timing_cache(config, cache_path, log)

    log(f"building TensorRT {trt.__version__} engine from {onnx_path} (this takes minutes)")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT could not build an engine (its messages are above)")
    log(f"built in {time.perf_counter() - start:.0f} s, {serialized.nbytes / 2**20:.1f} MiB")
    del parser
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(engine_path, bytes(memoryview(serialized)))
    if cache_path is not None:
        write_atomically(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return engine_path


def _make_logger(trt, log: Log):
    """A TensorRT logger that passes warnings and errors to ``log``."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                log(f"[TensorRT {severity.name}] {msg}")

    return _Logger()


def _parse(trt, network, logger, onnx_path: Path, log: Log):
    """Parse the ONNX file into ``network`` and return the parser; every parser error is
    logged, and all of them are in the UserError."""
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return parser
    errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    for error in errors:
        log(f"[TensorRT ONNX parser] {error}")
    raise UserError(f"{onnx_path}: TensorRT's ONNX parser rejected the graph "
                    f"({len(errors)} error(s)): " + "; ".join(errors))


def _describe_parser_error(error) -> str:
    """'node <name> (<op>): <description>' from a TensorRT ParserError."""
    name = getattr(error, "node_name", lambda: "")() or f"#{error.node()}"
    operator = getattr(error, "node_operator", lambda: "")()
    where = f"node {name} ({operator})" if operator else f"node {name}"
    return f"{where}: {error.desc()}"


def _has_qdq(trt, network) -> bool:
    kinds = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def _set_precision(trt, network, config, deploy_cfg: DeployConfig, log: Log) -> None:
    """FP16 per the deploy config; the INT8 flag (TensorRT 10) only where Q/DQ layers exist."""
    if deploy_cfg.backend.fp16_mode:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise UserError(f"{deploy_cfg.path}: backend_config.common_config.fp16_mode: TensorRT "
                            f"{trt.__version__} has no FP16 builder flag (strongly typed networks only); "
                            "set fp16_mode=False or export an FP16 graph")
        config.set_flag(trt.BuilderFlag.FP16)
    qdq = _has_qdq(trt, network)
    if qdq and hasattr(trt.BuilderFlag, "INT8"):
        config.set_flag(trt.BuilderFlag.INT8)
    log(f"precision: float parts {'FP16' if deploy_cfg.backend.fp16_mode else 'FP32'}, "
        f"INT8 {'from the Q/DQ nodes' if qdq else 'none (no Q/DQ nodes)'}")


def _profile(builder, network, deploy_cfg: DeployConfig):
    """One optimization profile with the deploy config's min/opt/max for each network input."""
    shapes = deploy_cfg.backend.input_shapes
    profile = builder.create_optimization_profile()
    key = "backend_config.model_inputs[0].input_shapes"
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        entry = shapes.get(tensor.name)
        if entry is None:
            if any(d < 0 for d in dims):
                raise UserError(f"{deploy_cfg.path}: {key}.{tensor.name}: missing; the graph's input "
                                f"'{tensor.name}' has dynamic shape {list(dims)}")
            continue
        for which in ("min_shape", "opt_shape", "max_shape"):
            shape = getattr(entry, which)
            if len(shape) != len(dims) or any(d >= 0 and d != s for d, s in zip(dims, shape)):
                raise UserError(f"{deploy_cfg.path}: {key}.{tensor.name}.{which}: {list(shape)} does not "
                                f"fit the graph's input shape {list(dims)} (-1 = dynamic)")
        profile.set_shape(tensor.name, entry.min_shape, entry.opt_shape, entry.max_shape)
    return profile


def _load_timing_cache(config, cache_path: Path | None, log: Log) -> None:
    """Start from the saved timing cache where one exists and matches this GPU and version."""
    data = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # a truncated or foreign file
        cache = None
    if cache is None or not config.set_timing_cache(cache, False):
        log(f"timing cache {cache_path} does not match this GPU/TensorRT; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    elif data:
        log(f"timing cache loaded from {cache_path}")
