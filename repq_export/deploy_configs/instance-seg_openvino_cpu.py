"""Swin Mask R-CNN / Cascade Mask R-CNN (QDQ) on OpenVINO, CPU, any padded image size.

Read as data by repq_export.deploy_config (never executed). OpenVINO reads the ONNX Q/DQ graph
and lowers QuantizeLinear to its FakeQuantize; it runs no code-exact integer kernels (it computes
x * (1/d), not x / d), so its verdict is the float64 rule on tiers 2 and 3, with tier 1 reported
as near-tie flips. Every RoiAlign is followed by Where(IsNaN(y), 0, y): OpenVINO's RoiAlign
returns NaN for a RoI of zero width or height, where onnxruntime and torchvision return 0.

graph_form: which exact lowering OpenVINO reads ('onnxruntime' or 'tensorrt', export/forms.py).
'tensorrt' (int8 codes, zero point 0): OpenVINO runs its convs, linears and q@k matmuls on int8
kernels, and its float parts stay within about 1 ulp of torch's (bundled Mask R-CNN, W4A4, 30
images: PASS, matched 90.8% against torch float32's 89.4%). The onnxruntime form also passes but
runs no faster on OpenVINO, and its float parts differ by thousands of ulps; it is the one for
8-bit (graph_form='onnxruntime'), since the TensorRT form carries 2..7 bits.
inference_precision: 'f32', set explicitly on every compile, because OpenVINO's default on CPUs
with BF16 or AMX is bf16, which the parity check FAILS at W4A4.
log_sqrt2_lowering: 'bisect' writes the softmax quantizers as comparisons and power-of-two
rescalings (export/qdq.py), the fake quantizer's codes exactly, which OpenVINO fuses into one JIT
kernel; 'table' (Log and two GatherElements lookups, the onnxruntime and TensorRT lowering) runs
on OpenVINO's reference kernels.
static_shapes: compile the graph for each input shape met (seconds for a new padded size; the
runner keeps the last two): only for static shapes does OpenVINO fuse the quantizers' elementwise
chains into single JIT kernels (docs/openvino.md has the timings).
Every export for OpenVINO also gives each weight DequantizeLinear its own codes
(export/unshared_weights.py), without which OpenVINO runs the RPN head's shared convs in f32.
"""
onnx_config = dict(
    type='onnx',
    opset_version=17,
    save_file='model.onnx',
    input_names=['img', 'img_hw'],
    output_names=['boxes', 'scores', 'labels', 'masks'],
    input_shape=None,
    dynamic_axes=dict(
        img={2: 'height', 3: 'width'},
        boxes={0: 'num_dets'},
        scores={0: 'num_dets'},
        labels={0: 'num_dets'},
        masks={0: 'num_dets'},
    ),
)
codebase_config = dict(
    type='mmdet',
    task='InstanceSegmentation',
    post_processing=dict(score_threshold=0.05, iou_threshold=0.5, keep_top_k=100, mask_thr_binary=0.5),
)
backend_config = dict(
    type='openvino',
    device='CPU',
    graph_form='tensorrt',
    inference_precision='f32',
    log_sqrt2_lowering='bisect',
    static_shapes=True,
)
