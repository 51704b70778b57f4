"""Swin Mask R-CNN / Cascade Mask R-CNN (QDQ) on onnxruntime, CPUs with VNNI, any padded image size.

Read as data by repq_export.deploy_config (never executed). A backend of type 'onnxruntime'
gets the onnxruntime form of the graph (uint8 activations, range clipped after QuantizeLinear,
int32 biases): at graph_optimization_level 'all' onnxruntime runs its convs and linears on
integer kernels (QLinearConv, QGemm, MatMulIntegerToFloat). target_cpu='vnni': 8-bit weights are
stored as full-range int8 codes (q - 128, zero point zp - 128) and multiplied once, not as two
halves (W8A8 about 1.35x faster at 800x1216; other bit widths are unchanged). Exact only on CPUs whose u8s8
kernels cannot saturate: x86 with AVX-512 VNNI, AVX-VNNI or AMX, and ARM64. The onnxruntime
runner refuses such a graph on any other CPU; use instance-seg_onnxruntime_cpu.py there.
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
    type='onnxruntime',
    providers=['CPUExecutionProvider'],
    graph_optimization_level='all',
    target_cpu='vnni',
)
