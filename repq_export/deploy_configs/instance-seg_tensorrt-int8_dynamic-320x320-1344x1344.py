"""Swin Mask R-CNN / Cascade Mask R-CNN (QDQ) as a TensorRT engine, padded sizes 320..1344.

Read as data by repq_export.deploy_config (never executed). INT8 comes from the graph's
Q/DQ nodes (explicit quantization), not from a builder flag or a calibrator. The float parts
run in FP32 (fp16_mode=False): that keeps parity with the fake-quant model, and TensorRT 11
has no FP16 builder flag at all. On TensorRT 10, fp16_mode=True runs them in FP16 (faster;
LayerNorm is one LayerNormalization op at opset 17, which avoids the FP16 overflow of the
decomposed form).
The profile is tuned (opt) for the COCO test size, 800 x 1344 after padding to 32.
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
    type='tensorrt',
    common_config=dict(fp16_mode=False, max_workspace_size=1 << 32),
    model_inputs=[
        dict(
            input_shapes=dict(
                img=dict(min_shape=[1, 3, 320, 320], opt_shape=[1, 3, 800, 1344], max_shape=[1, 3, 1344, 1344]),
                img_hw=dict(min_shape=[2], opt_shape=[2], max_shape=[2]),
            )
        )
    ],
)
