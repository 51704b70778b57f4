# A tiny Cascade Mask R-CNN (4conv1fc box heads with BatchNorm, 3 stages) with the Swin
# architecture's structure, for fast unit tests on a CPU: embed_dim 16, depths (2, 2, 2, 2),
# FPN width 32, 4 classes (the synthetic set's), images resized into (256, 192).
_base_ = [
    '../_base_/models/cascade_mask_rcnn_swin_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/default_runtime.py',
]
classes = ('ellipse', 'rectangle', 'triangle', 'star')
num_classes = 4
fpn_width = 32
conv_fc_head = dict(
    type='ConvFCBBoxHead',
    num_shared_convs=4,
    num_shared_fcs=1,
    in_channels=fpn_width,
    conv_out_channels=fpn_width,
    fc_out_channels=64,
    roi_feat_size=7,
    num_classes=num_classes,
    reg_class_agnostic=False,
    reg_decoded_bbox=True,
    norm_cfg=dict(type='SyncBN', requires_grad=True),
    loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
    loss_bbox=dict(type='GIoULoss', loss_weight=10.0))

model = dict(
    backbone=dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2], window_size=7),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=fpn_width),
    rpn_head=dict(in_channels=fpn_width, feat_channels=fpn_width),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=fpn_width),
        bbox_head=[
            dict(**conv_fc_head, bbox_coder=dict(
                type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                target_stds=[0.1, 0.1, 0.2, 0.2])),
            dict(**conv_fc_head, bbox_coder=dict(
                type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                target_stds=[0.05, 0.05, 0.1, 0.1])),
            dict(**conv_fc_head, bbox_coder=dict(
                type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                target_stds=[0.033, 0.033, 0.067, 0.067])),
        ],
        mask_roi_extractor=dict(out_channels=fpn_width),
        mask_head=dict(in_channels=fpn_width, conv_out_channels=fpn_width,
                       num_classes=num_classes)))

img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(256, 192),
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(type='Normalize', **img_norm_cfg),
            dict(type='Pad', size_divisor=32),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img']),
        ])
]
data = dict(
    val=dict(pipeline=test_pipeline, classes=classes),
    test=dict(pipeline=test_pipeline, classes=classes))
