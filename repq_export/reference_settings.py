"""The reference's test-time settings (test_cfg of the Swin Mask R-CNN configs): one home for the
defaults of the RPN, the RoI heads, the deploy configs' post-processing and the synthesized config.

Plain numbers, no torch, at the package top: models/, data/postprocess.py and the deploy-config
reader all import them downward.
"""

RPN_NMS_PRE = 1000  # test_cfg.rpn.nms_pre: top scores kept per level before NMS
RPN_NMS_IOU = 0.7  # test_cfg.rpn.nms.iou_threshold
RPN_MAX_PER_IMG = 1000  # test_cfg.rpn.max_per_img: proposals kept after NMS

RCNN_SCORE_THR = 0.05  # test_cfg.rcnn.score_thr
RCNN_NMS_IOU = 0.5  # test_cfg.rcnn.nms.iou_threshold
RCNN_MAX_PER_IMG = 100  # test_cfg.rcnn.max_per_img
MASK_THR_BINARY = 0.5  # test_cfg.rcnn.mask_thr_binary (host-side)

BOX_STDS = (0.1, 0.1, 0.2, 0.2)  # Mask R-CNN's DeltaXYWHBBoxCoder target_stds
CASCADE_STDS = (  # one a cascade stage
    (0.1, 0.1, 0.2, 0.2),
    (0.05, 0.05, 0.1, 0.1),
    (0.033, 0.033, 0.067, 0.067),
)
