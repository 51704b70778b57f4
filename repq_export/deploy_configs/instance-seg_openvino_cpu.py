"""Swin Mask R-CNN / Cascade Mask R-CNN (QDQ) on OpenVINO, CPU, any padded image size, W2A2..W8A8.

Read as data by repq_export.deploy_config (never executed). OpenVINO reads the ONNX Q/DQ graph
and lowers QuantizeLinear to its FakeQuantize; it runs no code-exact integer kernels (it computes
x * (1/d), not x / d), so its verdict is the float64 rule on tiers 2 and 3, with tier 1 reported
as near-tie flips. Every RoiAlign reads guarded RoIs: OpenVINO's RoiAlign returns NaN for a RoI
of zero width or height, where onnxruntime and torchvision return 0, so the graph moves such RoIs
far outside the image, where every RoiAlign pools exactly 0 (export/nan_guard.py).

graph_form: which exact lowering OpenVINO reads (export/forms.py). 'openvino' is the TensorRT
form (int8 codes, zero point 0) wherever the codes fit int8, i.e. at 2..7 bits the same graph, on
which OpenVINO runs its convs, linears and q@k matmuls on int8 kernels; at 8 bits it carries
activations as uint8 with their own zero point and weights as int8 codes q - 128 plus a float
zero-point correction beside each conv and linear, which OpenVINO also runs on int8 kernels.
'tensorrt' (2..7 bits) and 'onnxruntime' (the onnxruntime runner's form; it passes the verdict on
OpenVINO but runs its convs as f32 im2col matmuls there, about 3x slower at W8A8) are accepted too.
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
    graph_form='openvino',
    inference_precision='f32',
    log_sqrt2_lowering='bisect',
    static_shapes=True,
)
