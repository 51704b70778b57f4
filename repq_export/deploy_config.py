"""Deploy configs: mmdeploy-style Python files, read as data and validated.

A deploy config holds three literal dicts, in the vocabulary mmdeploy users know::

    onnx_config = dict(opset_version=17, input_names=['img', 'img_hw'], ...)
    backend_config = dict(type='tensorrt', common_config=dict(...), model_inputs=[...])
    codebase_config = dict(type='mmdet', task='InstanceSegmentation', post_processing=dict(...))

The file is never executed: it is read by the same safe, bounded evaluator as model configs
(``config_source.py``: literals, ``dict(...)``, lists, tuples, names bound earlier, arithmetic such
as ``1 << 32``); only the three sections above may be assigned.
Every problem is one ``UserError`` line naming the file and the key, e.g.
``deploy_configs/x.py: backend_config.common_config.fp16_mode: expected a bool, got 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from repq_export.boundary import INPUT_NAMES, OUTPUT_NAMES
from repq_export.config_source import evaluate_source
from repq_export.config_values import ValueReader, as_lists
from repq_export.errors import UserError
from repq_export.files import read_input_bytes
from repq_export.graph_targets import GraphForm, LogSqrt2Lowering, TargetCpu
from repq_export import reference_settings as ref  # post-processing defaults = the detector's test_cfg
from repq_export.resources import MAX_CONFIG_BYTES

MIN_OPSET = 17  # LayerNormalization is one op from opset 17 (FP16 overflow otherwise)
MAX_OPSET = 20  # the newest opset torch's TorchScript exporter (the one used here) writes
SIZE_DIVISOR = 32  # host preprocessing pads to a multiple of 32
MAX_IMAGE_SIDE = 8192  # a static or profile side past this costs memory, not accuracy (the reference pads to 1344)

ORT_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

#: backend_config.target_cpu: the CPUs an onnxruntime-form graph is exact on. 'any' (default):
#: int8 weight codes stay within +-64 and 8-bit weights are multiplied as two int8 halves, so no
#: u8s8 kernel can saturate on any CPU. 'vnni': 8-bit weights as full-range int8, one product per
#: layer (faster); exact only where u8s8 kernels do not add pairs of products in int16 (x86 with
#: AVX-512 VNNI, AVX-VNNI or AMX; ARM64), and the onnxruntime runner refuses other CPUs.
TARGET_ANY = TargetCpu.ANY
TARGET_VNNI = TargetCpu.VNNI
TARGET_CPUS = tuple(t.value for t in TargetCpu)

# mmdeploy keys that this project deliberately does not take, with the reason.
_NOT_TAKEN = {
    "int8_mode": "INT8 comes from the Q/DQ nodes of the exported graph (explicit quantization); remove it",
    "calib_config": "there is no TensorRT calibration: scales come from the quantized model; remove it",
    "_base_": "config inheritance is not supported; write the config out in full",
}


@dataclass(frozen=True)
class ShapeProfile:
    """A TensorRT optimization-profile entry for one input: min <= opt <= max per dim."""

    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]


@dataclass(frozen=True)
class OnnxConfig:
    """How the detector is exported to ONNX (passed to ``torch.onnx.export``)."""

    opset_version: int = MIN_OPSET
    save_file: str = "model.onnx"  # the ONNX file's name in the artifact; the engine gets its stem
    input_names: tuple[str, ...] = INPUT_NAMES
    output_names: tuple[str, ...] = OUTPUT_NAMES
    #: static export size as mmdeploy writes it, (width, height); None = dynamic
    input_shape: tuple[int, int] | None = None
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class OnnxRuntimeConfig:
    """onnxruntime session settings."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    #: at 'extended'/'all' onnxruntime forms its integer kernels (QLinearConv, MatMulIntegerToFloat).
    #: Those saturate full-range int8 weights on AVX2 CPUs without VNNI (docs/numerics.md); the
    #: exporter's int8 weight codes stay within +-64 (8-bit weights as two halves), so every level
    #: is exact for its graphs. 'basic' avoids the fusions for graphs from elsewhere.
    graph_optimization_level: str = "all"
    target_cpu: TargetCpu = TargetCpu.ANY  # see TARGET_CPUS
    type: str = "onnxruntime"


@dataclass(frozen=True)
class TensorRTConfig:
    """TensorRT builder settings: precision of the float parts, workspace, shape profiles."""

    fp16_mode: bool = False
    max_workspace_size: int = 1 << 30
    input_shapes: dict[str, ShapeProfile] = field(default_factory=dict)
    type: str = "tensorrt"


#: backend_config.graph_form of an OpenVINO deploy config: which exact lowering OpenVINO reads
#: (export/forms.py). Either gets the RoiAlign NaN guard (export/nan_guard.py).
OPENVINO_GRAPH_FORMS = (GraphForm.ONNXRUNTIME.value, GraphForm.TENSORRT.value, GraphForm.OPENVINO.value)
#: backend_config.inference_precision: set explicitly on every compile (OpenVINO's own default is
#: bf16 on CPUs with BF16/AMX); 'bf16' only where the parity check judged it.
OPENVINO_PRECISIONS = ("f32", "bf16")
#: backend_config.log_sqrt2_lowering: the softmax quantizer's ops, 'table' or 'bisect' (graph_targets.py)
LOG_SQRT2_LOWERINGS = tuple(v.value for v in LogSqrt2Lowering)


@dataclass(frozen=True)
class OpenVINOConfig:
    """OpenVINO CPU settings: the graph form it reads, its log-sqrt2 lowering, its inference precision."""

    graph_form: GraphForm = GraphForm.ONNXRUNTIME
    inference_precision: str = "f32"
    log_sqrt2_lowering: LogSqrt2Lowering = LogSqrt2Lowering.TABLE
    static_shapes: bool = False  # compile for each input shape met (runtime/openvino_runner.py)
    device: str = "CPU"
    type: str = "openvino"


@dataclass(frozen=True)
class PostProcessing:
    """R-CNN test settings the graph is exported with (mmdet 2.11 test_cfg names in brackets)."""

    score_threshold: float = ref.RCNN_SCORE_THR  # score_thr
    iou_threshold: float = ref.RCNN_NMS_IOU  # nms.iou_threshold
    keep_top_k: int = ref.RCNN_MAX_PER_IMG  # max_per_img
    mask_thr_binary: float = ref.MASK_THR_BINARY  # host-side mask threshold


@dataclass(frozen=True)
class CodebaseConfig:
    """Which task the exported network solves; only mmdet instance segmentation here."""

    type: str = "mmdet"
    task: str = "InstanceSegmentation"
    post_processing: PostProcessing = field(default_factory=PostProcessing)


BackendConfig = Union[OnnxRuntimeConfig, TensorRTConfig, OpenVINOConfig]


@dataclass(frozen=True)
class DeployConfig:
    """A validated deploy config file."""

    path: Path
    onnx: OnnxConfig
    backend: BackendConfig
    codebase: CodebaseConfig

    @property
    def backend_type(self) -> str:
        """'onnxruntime', 'tensorrt' or 'openvino'."""
        return self.backend.type


def load_deploy_config(path: str | Path, option: str | None = "--deploy-config") -> DeployConfig:
    """Read (a regular file within MAX_CONFIG_BYTES), parse (never execute) and validate a deploy config file."""
    path = Path(path)
    data = read_input_bytes(path, "deploy config", option, MAX_CONFIG_BYTES)
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a deploy config (not UTF-8 text; deploy configs are .py files)") from None
    sections = _parse_sections(path, source)
    reader = _Reader(path)
    onnx_cfg = reader.onnx_config(sections.get("onnx_config", {}))
    if "backend_config" not in sections:
        raise UserError(f"{path}: backend_config: missing (type='onnxruntime', 'tensorrt' or 'openvino')")
    backend = reader.backend_config(sections["backend_config"])
    codebase = reader.codebase_config(sections.get("codebase_config", {}))
    _check_static_shape(path, onnx_cfg, backend)
    return DeployConfig(path=path, onnx=onnx_cfg, backend=backend, codebase=codebase)


# ----------------------------------------------------------------------------- parsing


def _parse_sections(path: Path, source: str) -> dict[str, Any]:
    """The file's top-level assignments as Python values, through the safe config reader (never run)."""
    sections = evaluate_source(source, path)
    for name in sections:
        if name in _NOT_TAKEN:
            raise UserError(f"{path}: {name}: {_NOT_TAKEN[name]}")
        if name not in ("onnx_config", "backend_config", "codebase_config"):
            raise UserError(f"{path}: {name}: unknown key (expected onnx_config, backend_config, "
                            "codebase_config)")
    return as_lists(sections)


# -------------------------------------------------------------------------- validation


class _Reader(ValueReader):
    """Turns the parsed dicts into dataclasses; each method checks one section."""

    not_taken = _NOT_TAKEN

    # -- onnx_config

    def onnx_config(self, raw: Any) -> OnnxConfig:
        key = "onnx_config"
        raw = self.keys(key, raw, ("type", "opset_version", "save_file", "input_names",
                                   "output_names", "input_shape", "dynamic_axes"))
        if raw.get("type", "onnx") != "onnx":
            raise self.fail(f"{key}.type", f"must be 'onnx', got {raw['type']!r}")
        opset = self.expect(f"{key}.opset_version", raw.get("opset_version", MIN_OPSET), "int")
        if opset < MIN_OPSET:
            raise self.fail(f"{key}.opset_version", f"{opset} < {MIN_OPSET}: LayerNorm must export as one "
                            "LayerNormalization op (opset 17), or FP16 engines overflow")
        if opset > MAX_OPSET:
            raise self.fail(f"{key}.opset_version", f"{opset} > {MAX_OPSET}: the newest opset the exporter "
                            f"writes (use {MIN_OPSET}..{MAX_OPSET})")
        save_file = self.expect(f"{key}.save_file", raw.get("save_file", OnnxConfig.save_file), "str")
        if Path(save_file).name != save_file or not save_file.endswith(".onnx") or save_file.startswith("."):
            raise self.fail(f"{key}.save_file", f"must be a plain file name ending in .onnx (it is written "
                            f"inside the artifact folder), got {save_file!r}")
        names = {}
        for name_key, expected in (("input_names", INPUT_NAMES), ("output_names", OUTPUT_NAMES)):
            got = self.string_list(f"{key}.{name_key}", raw.get(name_key, list(expected)))
            if got != expected:
                raise self.fail(f"{key}.{name_key}", f"must be {list(expected)} (the network boundary "
                                f"every runner uses), got {list(got)}")
            names[name_key] = got
        input_shape = raw.get("input_shape")
        if input_shape is not None:
            input_shape = self.image_size(f"{key}.input_shape", input_shape)
        axes = self.dynamic_axes(f"{key}.dynamic_axes", raw.get("dynamic_axes", {}))
        if input_shape is not None and axes.get("img"):
            raise self.fail(f"{key}.dynamic_axes.img", "must be empty when input_shape gives a static size")
        return OnnxConfig(opset_version=opset, save_file=save_file, input_shape=input_shape,
                          dynamic_axes=axes, **names)

    def image_size(self, key: str, value: Any) -> tuple[int, int]:
        self.expect(key, value, "list")
        if len(value) != 2:
            raise self.fail(key, f"expected [width, height], got {value}")
        for i, side in enumerate(value):
            self.positive_int(f"{key}[{i}]", side)
            if side > MAX_IMAGE_SIDE:
                raise self.fail(f"{key}[{i}]", f"{side} > {MAX_IMAGE_SIDE}, the largest side taken")
            if side % SIZE_DIVISOR:
                raise self.fail(f"{key}[{i}]", f"{side} is not a multiple of {SIZE_DIVISOR}")
        return (value[0], value[1])

    def dynamic_axes(self, key: str, value: Any) -> dict[str, dict[int, str]]:
        """torch.onnx's dynamic_axes: img may vary in H, W (axes 2, 3); outputs in N (axis 0)."""
        allowed_axes = {"img": (2, 3), "img_hw": ()} | {name: (0,) for name in OUTPUT_NAMES}
        self.keys(key, value, tuple(allowed_axes))
        result = {}
        for name, axes in value.items():
            if isinstance(axes, list):  # torch also takes a list of axis indices
                for i, axis in enumerate(axes):
                    self.expect(f"{key}.{name}[{i}]", axis, "int")
                axes = {axis: f"{name}_{axis}" for axis in axes}
            self.expect(f"{key}.{name}", axes, "dict")
            for axis, label in axes.items():
                if axis not in allowed_axes[name]:
                    raise self.fail(f"{key}.{name}", f"axis {axis!r} cannot be dynamic "
                                    f"(allowed: {list(allowed_axes[name])})")
                self.expect(f"{key}.{name}.{axis}", label, "str")
            result[name] = dict(axes)
        return result

    # -- backend_config

    def backend_config(self, raw: Any) -> BackendConfig:
        key = "backend_config"
        self.expect(key, raw, "dict")
        kind = raw.get("type")
        if kind == "onnxruntime":
            return self.onnxruntime(key, raw)
        if kind == "tensorrt":
            return self.tensorrt(key, raw)
        if kind == "openvino":
            return self.openvino(key, raw)
        raise self.fail(f"{key}.type", f"must be 'onnxruntime', 'tensorrt' or 'openvino', got {kind!r}")

    def openvino(self, key: str, raw: dict) -> OpenVINOConfig:
        self.keys(key, raw, ("type", "graph_form", "inference_precision", "device", "log_sqrt2_lowering", "static_shapes"))
        form, precision, lowering = (self.one_of(f"{key}.{name}", raw.get(name, getattr(OpenVINOConfig, name)), allowed)
                                     for name, allowed in (("graph_form", OPENVINO_GRAPH_FORMS),
                                                           ("inference_precision", OPENVINO_PRECISIONS),
                                                           ("log_sqrt2_lowering", LOG_SQRT2_LOWERINGS)))
        self.one_of(f"{key}.device", raw.get("device", "CPU"), ("CPU",))
        static = self.expect(f"{key}.static_shapes", raw.get("static_shapes", False), "bool")
        return OpenVINOConfig(GraphForm(form), precision, LogSqrt2Lowering(lowering), static)

    def onnxruntime(self, key: str, raw: dict) -> OnnxRuntimeConfig:
        self.keys(key, raw, ("type", "providers", "graph_optimization_level", "target_cpu"))
        providers = self.string_list(f"{key}.providers", raw.get("providers", ["CPUExecutionProvider"]))
        if not providers:
            raise self.fail(f"{key}.providers", "must name at least one provider")
        for i, name in enumerate(providers):
            if not name.endswith("ExecutionProvider"):
                raise self.fail(f"{key}.providers[{i}]", f"{name!r} is not an onnxruntime provider name "
                                "(e.g. 'CUDAExecutionProvider')")
        level = self.expect(f"{key}.graph_optimization_level",
                            raw.get("graph_optimization_level", "all"), "str")
        if level not in ORT_OPTIMIZATION_LEVELS:
            raise self.fail(f"{key}.graph_optimization_level",
                            f"must be one of {list(ORT_OPTIMIZATION_LEVELS)}, got {level!r}")
        target = self.expect(f"{key}.target_cpu", raw.get("target_cpu", TARGET_ANY), "str")
        if target not in TARGET_CPUS:
            raise self.fail(f"{key}.target_cpu", f"must be one of {list(TARGET_CPUS)}, got {target!r}")
        return OnnxRuntimeConfig(providers=providers, graph_optimization_level=level, target_cpu=TargetCpu(target))

    def tensorrt(self, key: str, raw: dict) -> TensorRTConfig:
        self.keys(key, raw, ("type", "common_config", "model_inputs"))
        common = self.keys(f"{key}.common_config", raw.get("common_config", {}),
                           ("fp16_mode", "max_workspace_size"))
        fp16 = self.expect(f"{key}.common_config.fp16_mode", common.get("fp16_mode", False), "bool")
        workspace = self.positive_int(f"{key}.common_config.max_workspace_size",
                                      common.get("max_workspace_size", 1 << 30))
        inputs_key = f"{key}.model_inputs"
        model_inputs = self.expect(inputs_key, raw.get("model_inputs"), "list") \
            if "model_inputs" in raw else None
        if not model_inputs or len(model_inputs) != 1:
            raise self.fail(inputs_key, "expected a list of exactly one dict(input_shapes=dict(img=...)) "
                            "(one optimization profile)")
        entry = self.keys(f"{inputs_key}[0]", model_inputs[0], ("input_shapes",))
        shapes_key = f"{inputs_key}[0].input_shapes"
        shapes = self.keys(shapes_key, entry.get("input_shapes"), INPUT_NAMES)
        if "img" not in shapes:
            raise self.fail(f"{shapes_key}.img", "missing (min_shape/opt_shape/max_shape of the image)")
        profiles = {name: self.profile(f"{shapes_key}.{name}", name, value)
                    for name, value in shapes.items()}
        return TensorRTConfig(fp16_mode=fp16, max_workspace_size=workspace, input_shapes=profiles)

    def profile(self, key: str, name: str, raw: Any) -> ShapeProfile:
        """One input's min/opt/max: img is [1, 3, H, W] with H, W multiples of 32; img_hw is [2]."""
        raw = self.keys(key, raw, ("min_shape", "opt_shape", "max_shape"))
        shapes = {}
        for which in ("min_shape", "opt_shape", "max_shape"):
            if which not in raw:
                raise self.fail(f"{key}.{which}", "missing")
            shape = self.expect(f"{key}.{which}", raw[which], "list")
            for i, dim in enumerate(shape):
                self.positive_int(f"{key}.{which}[{i}]", dim)
            if name == "img_hw" and shape != [2]:
                raise self.fail(f"{key}.{which}", f"img_hw is a (h, w) vector: expected [2], got {shape}")
            if name == "img":
                if len(shape) != 4 or shape[:2] != [1, 3]:
                    raise self.fail(f"{key}.{which}", f"expected [1, 3, H, W] (batch 1), got {shape}")
                for i in (2, 3):
                    if shape[i] > MAX_IMAGE_SIDE:
                        raise self.fail(f"{key}.{which}[{i}]", f"{shape[i]} > {MAX_IMAGE_SIDE}, the largest side taken")
                    if shape[i] % SIZE_DIVISOR:
                        raise self.fail(f"{key}.{which}[{i}]",
                                        f"{shape[i]} is not a multiple of {SIZE_DIVISOR}")
            shapes[which] = tuple(shape)
        for low, high in (("min_shape", "opt_shape"), ("opt_shape", "max_shape")):
            for i, (a, b) in enumerate(zip(shapes[low], shapes[high])):
                if a > b:
                    raise self.fail(f"{key}.{low}[{i}]", f"{a} > {high}[{i}] = {b} (need min <= opt <= max)")
        return ShapeProfile(**shapes)

    # -- codebase_config

    def codebase_config(self, raw: Any) -> CodebaseConfig:
        key = "codebase_config"
        raw = self.keys(key, raw, ("type", "task", "post_processing"))
        if raw.get("type", "mmdet") != "mmdet":
            raise self.fail(f"{key}.type", f"must be 'mmdet', got {raw['type']!r}")
        if raw.get("task", "InstanceSegmentation") != "InstanceSegmentation":
            raise self.fail(f"{key}.task", "must be 'InstanceSegmentation' (the network always "
                            f"returns masks), got {raw['task']!r}")
        post_key = f"{key}.post_processing"
        post = self.keys(post_key, raw.get("post_processing", {}),
                         ("score_threshold", "iou_threshold", "keep_top_k", "mask_thr_binary"))
        defaults = PostProcessing()
        processing = PostProcessing(
            score_threshold=self.fraction(f"{post_key}.score_threshold",
                                          post.get("score_threshold", defaults.score_threshold)),
            iou_threshold=self.fraction(f"{post_key}.iou_threshold",
                                        post.get("iou_threshold", defaults.iou_threshold)),
            keep_top_k=self.positive_int(f"{post_key}.keep_top_k",
                                         post.get("keep_top_k", defaults.keep_top_k)),
            mask_thr_binary=self.fraction(f"{post_key}.mask_thr_binary",
                                          post.get("mask_thr_binary", defaults.mask_thr_binary)))
        return CodebaseConfig(post_processing=processing)


def _check_static_shape(path: Path, onnx_cfg: OnnxConfig, backend: BackendConfig) -> None:
    """A static export (input_shape) needs a TensorRT profile fixed at exactly that size."""
    if onnx_cfg.input_shape is None or not isinstance(backend, TensorRTConfig):
        return
    width, height = onnx_cfg.input_shape
    expected = (1, 3, height, width)
    img = backend.input_shapes["img"]
    for which in ("min_shape", "opt_shape", "max_shape"):
        if getattr(img, which) != expected:
            raise UserError(f"{path}: backend_config.model_inputs[0].input_shapes.img.{which}: "
                            f"must be {list(expected)} for the static onnx_config.input_shape "
                            f"[{width}, {height}], got {list(getattr(img, which))}")
