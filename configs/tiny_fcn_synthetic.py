# Tiny CPU model: a random-init TinyCNN feeding our FCNHead, on generated ADE-layout data.
# Trains to a real mIoU in about a minute on 2 CPU cores (one or two workers).
_base_ = ['./_base_/datasets/synthetic_ade.py', './_base_/default_runtime.py']
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    pretrained=None,
    backbone=dict(type='TinyCNN', stage_channels=(16, 32, 32), stem_stride=2, out_indices=(2,),
                  norm_cfg=norm_cfg),
    decode_head=dict(
        type='FCNHead',
        in_channels=32,
        in_index=0,
        channels=16,
        num_convs=1,
        kernel_size=3,
        concat_input=True,
        with_norm=False,
        dropout_ratio=0.1,
        num_classes={{_base_.num_classes}},
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0,
                         avg_non_ignore=True)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
optimizer = dict(type='AdamW', lr=3e-3, weight_decay=1e-4)
optimizer_config = dict()
lr_config = dict(policy='poly', power=1.0, min_lr=1e-5, by_epoch=False)
runner = dict(type='IterBasedRunner', max_iters=300)
checkpoint_config = dict(by_epoch=False, interval=300)
evaluation = dict(interval=100, metric='mIoU', pre_eval=True)
seed = 0
