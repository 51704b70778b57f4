"""Swin Mask R-CNN / Cascade Mask R-CNN (QDQ) as a TensorRT engine fixed at 800 x 1344 (h x w).

Read as data by repq_export.deploy_config (never executed). Every image must be padded
(bottom/right) to exactly 800 x 1344, so only landscape images resized to (1333, 800) fit;
use the dynamic config for portrait images. INT8 comes from the graph's Q/DQ nodes; the
float parts run in FP32 (see the dynamic config for fp16_mode).
"""
onnx_config = dict(
    type='onnx',
    opset_version=17,
    save_file='model.onnx',
    input_names=['img', 'img_hw'],
    output_names=['boxes', 'scores', 'labels', 'masks'],
    input_shape=[1344, 800],
    dynamic_axes=dict(
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
    type='tensorrt',
    common_config=dict(fp16_mode=False, max_workspace_size=1 << 32),
    model_inputs=[
        dict(
            input_shapes=dict(
                img=dict(min_shape=[1, 3, 800, 1344], opt_shape=[1, 3, 800, 1344], max_shape=[1, 3, 800, 1344]),
                img_hw=dict(min_shape=[2], opt_shape=[2], max_shape=[2]),
            )
        )
    ],
)
