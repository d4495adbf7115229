# InternVL's linear probing on ADE20K (its configs/intern_vit_6b/linear_probing/): a frozen
# InternViT-6B (patch 14, width 3200, depth 48, 25 heads, QK norm; block 44's output; bf16 from
# the start) feeding FCNHead(num_convs=0, with_norm=True, fp32) on 150 classes at 504 px crops;
# AdamW lr 4e-5 without weight decay or layer decay, 1500 warmup iterations, 80k iterations of
# 16 images (8 GPUs x 2). Published: 47.2 mIoU. Used by search_spaces/linear_probe.yaml.
# The weights path is relative to where you run from (as InternVL's tools/train.py); a sweep
# sets it with `overrides: {model.backbone.pretrained: ...}`.
_base_ = ['./_base_/datasets/ade20k_504.py', './_base_/default_runtime.py']
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    pretrained=None,
    backbone=dict(
        type='InternViT6B', preset='6B', pretrain_size=224, img_size=504, patch_size=14,
        drop_path_rate=0.0, init_values=0.1, with_cp=True, use_flash_attn=True,
        layerscale_force_fp32=False, freeze_vit=True, out_indices=[44],
        pretrained='pretrained/intern_vit_6b_224px.pth'),
    decode_head=dict(
        type='FCNHead',
        in_channels=3200,
        in_index=0,
        channels=3200,
        num_convs=0,
        concat_input=False,
        with_norm=True,
        dropout_ratio=0.0,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(504, 504), stride=(322, 322)))
optimizer = dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.0,
                 constructor='CustomLayerDecayOptimizerConstructor',
                 paramwise_cfg=dict(num_layers=48, layer_decay_rate=1.0))
optimizer_config = dict()
lr_config = dict(policy='poly', warmup='linear', warmup_iters=1500, warmup_ratio=1e-6,
                 power=1.0, min_lr=0.0, by_epoch=False)
data = dict(samples_per_gpu=2)
runner = dict(type='IterBasedRunner', max_iters=80000)
checkpoint_config = dict(by_epoch=False, interval=1000, max_keep_ckpts=2)
evaluation = dict(interval=1000, metric='mIoU', pre_eval=True, save_best='mIoU')
dist_params = dict(backend='nccl')
seed = 0
custom_hooks = [dict(type='ToBFloat16Hook', priority=49)]
