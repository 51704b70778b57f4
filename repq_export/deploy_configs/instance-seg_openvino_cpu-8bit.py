"""Swin Mask R-CNN / Cascade Mask R-CNN (QDQ) on OpenVINO, CPU, 8-bit (W8A8): the onnxruntime form.

Read as data by repq_export.deploy_config (never executed). The TensorRT form carries 2..7 bits
(int8 codes with zero point 0 cannot hold 8-bit asymmetric codes), so the 8-bit graph for
OpenVINO is the onnxruntime form (uint8 activations with their own zero point), with the same
RoiAlign NaN guard, log-sqrt2 lowering ('bisect'), static shapes and inference precision f32 as
instance-seg_openvino_cpu.py. Its verdict is the float64 rule on tiers 2 and 3, tier 1 reported
as near-tie flips.
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
    graph_form='onnxruntime',
    inference_precision='f32',
    log_sqrt2_lowering='bisect',
    static_shapes=True,
)
