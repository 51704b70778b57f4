# A tiny Mask R-CNN with the Swin-T architecture's structure, for fast unit tests on a CPU:
# embed_dim 16, two blocks a stage (so shifted windows are exercised), FPN width 32,
# 4 classes (the synthetic set's), images resized into (256, 192).
_base_ = [
    '../_base_/models/mask_rcnn_swin_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/default_runtime.py',
]
classes = ('ellipse', 'rectangle', 'triangle', 'star')
num_classes = 4
fpn_width = 32

model = dict(
    backbone=dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2], window_size=7),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=fpn_width),
    rpn_head=dict(in_channels=fpn_width, feat_channels=fpn_width),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=fpn_width),
        bbox_head=dict(in_channels=fpn_width, fc_out_channels=64, num_classes=num_classes),
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
