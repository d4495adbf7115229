# Frozen-backbone probing at toy size: a tiny InternViT (depth 2, width 64, patch 8, random
# weights, frozen) feeding our FCNHead, on generated ADE-layout data. Trials of this config that
# differ only in head-side values train as one trial group (one backbone pass per batch).
_base_ = ['./_base_/datasets/synthetic_ade.py', './_base_/default_runtime.py']
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    pretrained=None,
    backbone=dict(type='InternViT', preset='300M', embed_dim=64, depth=2, num_heads=4,
                  patch_size=8, img_size=64, pretrain_size=64, freeze_vit=True,
                  out_indices=[1]),
    decode_head=dict(
        type='FCNHead',
        in_channels=64,
        in_index=0,
        channels=32,
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
