"""Deploy configs: the four shipped files load as expected; every kind of bad input is one
UserError line naming the file and the key; nothing in a config file is ever executed."""

from pathlib import Path

import pytest

from repq_export.deploy_config import (
    OnnxRuntimeConfig,
    ShapeProfile,
    TensorRTConfig,
    load_deploy_config,
)
from repq_export.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "deploy_configs"

GOOD_TRT = """
onnx_config = dict(opset_version=17, input_names=['img', 'img_hw'],
                   output_names=['boxes', 'scores', 'labels', 'masks'],
                   dynamic_axes=dict(img={2: 'height', 3: 'width'}))
backend_config = dict(
    type='tensorrt',
    common_config=dict(fp16_mode=True, max_workspace_size=1 << 30),
    model_inputs=[dict(input_shapes=dict(
        img=dict(min_shape=[1, 3, 320, 320], opt_shape=[1, 3, 800, 1344], max_shape=[1, 3, 1344, 1344])))])
"""


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_deploy_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}") and "\n" not in message
    return message


def test_shipped_onnxruntime_configs():
    cpu = load_deploy_config(CONFIGS / "instance-seg_onnxruntime_cpu.py")
    cuda = load_deploy_config(CONFIGS / "instance-seg_onnxruntime_cuda.py")
    vnni = load_deploy_config(CONFIGS / "instance-seg_onnxruntime_cpu-vnni.py")
    assert cpu.backend == OnnxRuntimeConfig(providers=("CPUExecutionProvider",), graph_optimization_level="all",
                                            target_cpu="any")
    assert vnni.backend == OnnxRuntimeConfig(providers=("CPUExecutionProvider",), graph_optimization_level="all",
                                             target_cpu="vnni")
    assert (vnni.onnx, vnni.codebase) == (cpu.onnx, cpu.codebase)  # only the target CPU differs
    assert cuda.backend.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    for cfg in (cpu, cuda):
        assert cfg.backend_type == "onnxruntime"
        assert cfg.onnx.opset_version == 17 and cfg.onnx.input_shape is None
        assert cfg.onnx.input_names == ("img", "img_hw")
        assert cfg.onnx.output_names == ("boxes", "scores", "labels", "masks")
        assert cfg.onnx.dynamic_axes["img"] == {2: "height", 3: "width"}
        assert cfg.onnx.dynamic_axes["masks"] == {0: "num_dets"}
        post = cfg.codebase.post_processing
        assert (post.score_threshold, post.iou_threshold, post.keep_top_k, post.mask_thr_binary) == \
            (0.05, 0.5, 100, 0.5)


def test_shipped_tensorrt_dynamic_config():
    cfg = load_deploy_config(CONFIGS / "instance-seg_tensorrt-int8_dynamic-320x320-1344x1344.py")
    assert isinstance(cfg.backend, TensorRTConfig) and cfg.backend_type == "tensorrt"
    assert cfg.backend.fp16_mode is False and cfg.backend.max_workspace_size == 4 * 2**30
    assert cfg.backend.input_shapes["img"] == ShapeProfile((1, 3, 320, 320), (1, 3, 800, 1344), (1, 3, 1344, 1344))
    assert cfg.backend.input_shapes["img_hw"] == ShapeProfile((2,), (2,), (2,))
    assert cfg.onnx.input_shape is None and cfg.onnx.dynamic_axes["img"] == {2: "height", 3: "width"}


def test_shipped_tensorrt_static_config():
    cfg = load_deploy_config(CONFIGS / "instance-seg_tensorrt-int8_static-800x1344.py")
    assert cfg.onnx.input_shape == (1344, 800) and "img" not in cfg.onnx.dynamic_axes
    fixed = (1, 3, 800, 1344)
    assert cfg.backend.input_shapes["img"] == ShapeProfile(fixed, fixed, fixed)


def test_defaults_and_literal_forms(tmp_path):
    cfg = load_deploy_config(write(tmp_path, '"""doc"""\nbackend_config = {"type": "onnxruntime"}\n'))
    assert cfg.backend == OnnxRuntimeConfig()
    assert cfg.onnx.opset_version == 17 and cfg.codebase.task == "InstanceSegmentation"
    cfg = load_deploy_config(write(tmp_path, GOOD_TRT))
    assert cfg.backend.fp16_mode is True and cfg.backend.max_workspace_size == 2**30


def test_missing_file_and_syntax_error(tmp_path):
    with pytest.raises(UserError, match=r"nope.py: deploy config file not found"):
        load_deploy_config(tmp_path / "nope.py")
    assert "invalid Python syntax" in error_of(tmp_path, "backend_config = dict(type=\n")


def test_code_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    attacks = [
        f"backend_config = dict(type=__import__('os').system('touch {marker}'))",
        f"import os\nos.system('touch {marker}')",
        f"open('{marker}', 'w')",
        f"backend_config = dict(type='onnxruntime', providers=[open('{marker}', 'w').name])",
        "backend_config = 'x' if True else 'y'",
    ]
    for text in attacks:
        message = error_of(tmp_path, text)
        assert "are allowed" in message, message
    assert not marker.exists()


def test_unknown_keys(tmp_path):
    assert "foo: unknown key" in error_of(tmp_path, GOOD_TRT + "foo = 1\n")
    text = GOOD_TRT.replace("fp16_mode=True,", "fp16_mode=True, strict=True,")
    assert "backend_config.common_config.strict: unknown key" in error_of(tmp_path, text)
    text = GOOD_TRT.replace("type='tensorrt',", "type='tensorrt', providers=['CPUExecutionProvider'],")
    assert "backend_config.providers: unknown key" in error_of(tmp_path, text)
    text = GOOD_TRT.replace("fp16_mode=True,", "fp16_mode=True, int8_mode=True,")
    assert "common_config.int8_mode: INT8 comes from the Q/DQ nodes" in error_of(tmp_path, text)
    assert "_base_: config inheritance" in error_of(tmp_path, "_base_ = ['./base.py']\n" + GOOD_TRT)


@pytest.mark.parametrize("old, new, expected", [
    ("opset_version=17", "opset_version='17'", "onnx_config.opset_version: expected an int, got a string '17'"),
    ("fp16_mode=True", "fp16_mode=1", "common_config.fp16_mode: expected a bool, got an int 1"),
    ("max_workspace_size=1 << 30", "max_workspace_size=True", "max_workspace_size: expected an int, got a bool"),
    ("min_shape=[1, 3, 320, 320]", "min_shape=(1, 3, 'h', 320)", "img.min_shape[2]: expected an int"),
    ("dynamic_axes=dict(img={2: 'height', 3: 'width'})", "dynamic_axes=dict(img={2: 7})",
     "onnx_config.dynamic_axes.img.2: expected a string, got an int 7"),
])
def test_wrong_types(tmp_path, old, new, expected):
    assert old in GOOD_TRT
    assert expected in error_of(tmp_path, GOOD_TRT.replace(old, new))


def test_wrong_providers_type(tmp_path):
    message = error_of(tmp_path, "backend_config = dict(type='onnxruntime', providers='CPUExecutionProvider')")
    assert "backend_config.providers: expected a list, got a string" in message


@pytest.mark.parametrize("old, new, expected", [
    ("min_shape=[1, 3, 320, 320]", "min_shape=[1, 3, 320, 1600]",
     "img.min_shape[3]: 1600 > opt_shape[3] = 1344 (need min <= opt <= max)"),
    ("max_shape=[1, 3, 1344, 1344]", "max_shape=[1, 3, 640, 1344]",
     "img.opt_shape[2]: 800 > max_shape[2] = 640"),
    ("min_shape=[1, 3, 320, 320]", "min_shape=[1, 3, 330, 320]", "img.min_shape[2]: 330 is not a multiple of 32"),
    ("opt_shape=[1, 3, 800, 1344]", "opt_shape=[2, 3, 800, 1344]", "img.opt_shape: expected [1, 3, H, W] (batch 1)"),
    ("min_shape=[1, 3, 320, 320]", "min_shape=[1, 3, 320]", "img.min_shape: expected [1, 3, H, W]"),
    ("min_shape=[1, 3, 320, 320]", "min_shape=[1, 3, 0, 320]", "img.min_shape[2]: must be positive"),
])
def test_bad_shape_profiles(tmp_path, old, new, expected):
    message = error_of(tmp_path, GOOD_TRT.replace(old, new))
    assert f"backend_config.model_inputs[0].input_shapes.{expected}" in message


def test_profile_structure_errors(tmp_path):
    text = GOOD_TRT.replace("img=dict(", "img_hw=dict(min_shape=[3], opt_shape=[2], max_shape=[2]), img=dict(")
    assert "input_shapes.img_hw.min_shape: img_hw is a (h, w) vector: expected [2], got [3]" in \
        error_of(tmp_path, text)
    text = GOOD_TRT.replace("max_shape=[1, 3, 1344, 1344]", "")
    assert "img.max_shape: missing" in error_of(tmp_path, text)
    assert "model_inputs: expected a list of exactly one" in error_of(
        tmp_path, "backend_config = dict(type='tensorrt')")
    assert "input_shapes.img: missing" in error_of(
        tmp_path, "backend_config = dict(type='tensorrt', model_inputs=[dict(input_shapes=dict())])")


def test_opset_below_17(tmp_path):
    message = error_of(tmp_path, GOOD_TRT.replace("opset_version=17", "opset_version=16"))
    assert "onnx_config.opset_version: 16 < 17" in message


def test_network_boundary_names_are_fixed(tmp_path):
    message = error_of(tmp_path, GOOD_TRT.replace("input_names=['img', 'img_hw']", "input_names=['input']"))
    assert "onnx_config.input_names: must be ['img', 'img_hw']" in message


def test_dynamic_axes_rules(tmp_path):
    text = GOOD_TRT.replace("img={2: 'height', 3: 'width'}", "img={0: 'batch', 2: 'height'}")
    assert "onnx_config.dynamic_axes.img: axis 0 cannot be dynamic" in error_of(tmp_path, text)
    text = GOOD_TRT.replace("img={2: 'height', 3: 'width'}", "img=[2, 3], boxes=[0]")
    cfg = load_deploy_config(write(tmp_path, text))
    assert cfg.onnx.dynamic_axes == {"img": {2: "img_2", 3: "img_3"}, "boxes": {0: "boxes_0"}}
    text = GOOD_TRT.replace("img={2: 'height', 3: 'width'}", "output={0: 'n'}")
    assert "dynamic_axes.output: unknown key" in error_of(tmp_path, text)


def test_static_shape_must_match_the_profile(tmp_path):
    text = GOOD_TRT.replace("dynamic_axes=dict(img={2: 'height', 3: 'width'})", "input_shape=[1344, 800]")
    message = error_of(tmp_path, text)
    assert "input_shapes.img.min_shape: must be [1, 3, 800, 1344] for the static onnx_config.input_shape" in message
    text = GOOD_TRT.replace("dynamic_axes=dict(", "input_shape=[1344, 800], dynamic_axes=dict(")
    assert "dynamic_axes.img: must be empty when input_shape" in error_of(tmp_path, text)
    text = GOOD_TRT.replace("dynamic_axes=dict(img={2: 'height', 3: 'width'})", "input_shape=[1344, 810]")
    assert "onnx_config.input_shape[1]: 810 is not a multiple of 32" in error_of(tmp_path, text)


def test_backend_and_codebase_values(tmp_path):
    assert "backend_config.type: must be 'onnxruntime', 'tensorrt' or 'openvino', got 'ncnn'" in \
        error_of(tmp_path, "backend_config = dict(type='ncnn')")
    assert "backend_config: missing" in error_of(tmp_path, "onnx_config = dict(opset_version=17)")
    assert "providers[0]: 'CUDA' is not an onnxruntime provider name" in \
        error_of(tmp_path, "backend_config = dict(type='onnxruntime', providers=['CUDA'])")
    assert "graph_optimization_level: must be one of" in \
        error_of(tmp_path, "backend_config = dict(type='onnxruntime', graph_optimization_level='max')")
    assert "backend_config.target_cpu: must be one of ['any', 'vnni'], got 'avx2'" in \
        error_of(tmp_path, "backend_config = dict(type='onnxruntime', target_cpu='avx2')")
    ort = "backend_config = dict(type='onnxruntime')\n"
    assert "codebase_config.task: must be 'InstanceSegmentation'" in \
        error_of(tmp_path, ort + "codebase_config = dict(task='ObjectDetection')")
    assert "post_processing.score_threshold: must lie in [0, 1], got 1.5" in \
        error_of(tmp_path, ort + "codebase_config = dict(post_processing=dict(score_threshold=1.5))")
    assert "post_processing.keep_top_k: must be positive, got 0" in \
        error_of(tmp_path, ort + "codebase_config = dict(post_processing=dict(keep_top_k=0))")


def test_pathologically_nested_config_is_a_user_error(tmp_path):
    assert "nested too deeply" in error_of(tmp_path, "onnx_config = 1" + " << 1" * 100000)
    assert "nested too deeply" in error_of(tmp_path, "onnx_config = " + "-" * 100000 + "1")


@pytest.mark.parametrize("opset, accepted", [(17, True), (20, True), (21, False), (99, False)])
def test_opset_range(tmp_path, opset, accepted):
    """17..20: LayerNormalization is one op from 17, 20 is the newest the TorchScript exporter writes."""
    text = GOOD_TRT.replace("opset_version=17", f"opset_version={opset}")
    if accepted:
        assert load_deploy_config(write(tmp_path, text)).onnx.opset_version == opset
    else:
        assert f"onnx_config.opset_version: {opset} > 20" in error_of(tmp_path, text)


def test_image_sides_are_bounded(tmp_path):
    """A 30000-pixel profile or static side is refused when the file is read, not after calibration."""
    message = error_of(tmp_path, GOOD_TRT.replace("max_shape=[1, 3, 1344, 1344]", "max_shape=[1, 3, 1344, 30016]"))
    assert "img.max_shape[3]: 30016 > 8192" in message
    static = GOOD_TRT.replace("dynamic_axes=dict(img={2: 'height', 3: 'width'})", "input_shape=[30016, 800]")
    assert "onnx_config.input_shape[0]: 30016 > 8192" in error_of(tmp_path, static)
