# A small Swin Cascade Mask R-CNN (3 stages, 4conv1fc box heads with BatchNorm, GIoU-trained
# class-specific regression on decoded boxes) trained on the project's synthetic shapes set
# (repq_export.data.synthetic): embed_dim 32, depths (2, 2, 2, 2), FPN width 64, fc 256, 4 classes,
# images resized into (667, 400). Made by tools/train_synthetic.py (train_cfg, optimizer, lr_config
# and runner below are what it reads) with --init-from the bundled Mask R-CNN: backbone, neck and
# RPN start from its weights (as a real Cascade starts from a pretrained backbone), the cascade
# heads from mmdet's initialisation. Shipped as repq_export/assets/cascade_mask_rcnn_swin_synthetic.pth.
_base_ = [
    '../_base_/models/cascade_mask_rcnn_swin_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/default_runtime.py',
]
classes = ('ellipse', 'rectangle', 'triangle', 'star')
num_classes = 4
embed_dim = 32
fpn_width = 64
img_scale = (667, 400)
conv_fc_head = dict(
    type='ConvFCBBoxHead',
    num_shared_convs=4,
    num_shared_fcs=1,
    in_channels=fpn_width,
    conv_out_channels=fpn_width,
    fc_out_channels=256,
    roi_feat_size=7,
    num_classes=num_classes,
    reg_class_agnostic=False,
    reg_decoded_bbox=True,
    norm_cfg=dict(type='BN', requires_grad=True),
    loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
    loss_bbox=dict(type='GIoULoss', loss_weight=10.0))
# One stage's R-CNN training settings (mmdet 2.11 cascade train_cfg), the IoU threshold aside.
# The sampler draws 64 RoIs an image and stage instead of 512: a synthetic image holds at most
# 8 objects, and the CPU budget is tight.
rcnn_sampler = dict(type='RandomSampler', num=64, pos_fraction=0.25, neg_pos_ub=-1,
                    add_gt_as_proposals=True)
rcnn_assigner = dict(type='MaxIoUAssigner', match_low_quality=False, ignore_iof_thr=-1)

model = dict(
    backbone=dict(embed_dim=embed_dim, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7,
                  drop_path_rate=0.0),
    neck=dict(in_channels=[embed_dim, embed_dim * 2, embed_dim * 4, embed_dim * 8],
              out_channels=fpn_width),
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
                       num_classes=num_classes)),
    # mmdet 2.11 Cascade Mask R-CNN train_cfg: IoU 0.5 / 0.6 / 0.7 stages, with the test-time
    # RPN proposal settings (1000 before and after NMS) to save time.
    train_cfg=dict(
        rpn=dict(
            assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                          match_low_quality=True, ignore_iof_thr=-1),
            sampler=dict(type='RandomSampler', num=256, pos_fraction=0.5, neg_pos_ub=-1,
                         add_gt_as_proposals=False),
            allowed_border=0,
            pos_weight=-1,
            debug=False),
        rpn_proposal=dict(nms_across_levels=False, nms_pre=1000, nms_post=1000, max_per_img=1000,
                          nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
        rcnn=[
            dict(assigner=dict(**rcnn_assigner, pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5),
                 sampler=rcnn_sampler, mask_size=28, pos_weight=-1, debug=False),
            dict(assigner=dict(**rcnn_assigner, pos_iou_thr=0.6, neg_iou_thr=0.6, min_pos_iou=0.6),
                 sampler=rcnn_sampler, mask_size=28, pos_weight=-1, debug=False),
            dict(assigner=dict(**rcnn_assigner, pos_iou_thr=0.7, neg_iou_thr=0.7, min_pos_iou=0.7),
                 sampler=rcnn_sampler, mask_size=28, pos_weight=-1, debug=False),
        ]))

img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', img_scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(type='Normalize', **img_norm_cfg),
    dict(type='Pad', size_divisor=32),
    dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_bboxes', 'gt_labels', 'gt_masks']),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=img_scale,
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
    samples_per_gpu=4,
    train=dict(ann_file='data/synthetic/annotations/instances_train.json',
               img_prefix='data/synthetic/train/', pipeline=train_pipeline, classes=classes),
    val=dict(ann_file='data/synthetic/annotations/instances_val.json',
             img_prefix='data/synthetic/val/', pipeline=test_pipeline, classes=classes),
    test=dict(ann_file='data/synthetic/annotations/instances_val.json',
              img_prefix='data/synthetic/val/', pipeline=test_pipeline, classes=classes))

# AdamW with no weight decay on norms and the relative position bias tables (as the Swin configs),
# linear warm-up then cosine decay, per iteration.
optimizer = dict(type='AdamW', lr=0.001, betas=(0.9, 0.999), weight_decay=0.05,
                 paramwise_cfg=dict(custom_keys=dict(
                     absolute_pos_embed=dict(decay_mult=0.),
                     relative_position_bias_table=dict(decay_mult=0.),
                     norm=dict(decay_mult=0.))))
optimizer_config = dict(grad_clip=dict(max_norm=10.0, norm_type=2))
lr_config = dict(policy='CosineAnnealing', warmup='linear', warmup_iters=50, warmup_ratio=0.001,
                 min_lr_ratio=0.01, by_epoch=False)
runner = dict(type='IterBasedRunner', max_iters=300)
