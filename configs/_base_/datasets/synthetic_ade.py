# Generated ADE20K-layout data (mmseg_custom.datasets.generate_ade_layout), K classes, 64 px.
dataset_type = 'ADELayoutDataset'
data_root = 'data/synthetic_ade'
num_classes = 4
crop_size = (64, 64)
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Normalize', **img_norm_cfg),
    dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_semantic_seg']),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='MultiScaleFlipAug', img_scale=crop_size, flip=False,
         transforms=[
             dict(type='Resize', keep_ratio=True),
             dict(type='Normalize', **img_norm_cfg),
             dict(type='ImageToTensor', keys=['img']),
             dict(type='Collect', keys=['img']),
         ]),
]
data = dict(
    samples_per_gpu=4,
    workers_per_gpu=0,
    persistent_workers=False,  # mmseg's default True is refused by torch with 0 loader workers
    train=dict(type=dataset_type, data_root=data_root, num_classes=num_classes,
               img_dir='images/training', ann_dir='annotations/training', pipeline=train_pipeline),
    val=dict(type=dataset_type, data_root=data_root, num_classes=num_classes,
             img_dir='images/validation', ann_dir='annotations/validation', pipeline=test_pipeline),
    test=dict(type=dataset_type, data_root=data_root, num_classes=num_classes,
              img_dir='images/validation', ann_dir='annotations/validation', pipeline=test_pipeline))
