# The InternVL few-shot / linear-probing setting on ADE20K: a frozen InternViT-6B (patch 14,
# embed 3200, depth 48, 25 heads, no qkv bias, QK norm; weights from the local file below, run in
# bf16 by ToBFloat16Hook) feeding FCNHead(num_convs=0, with_norm=True, fp32) on 150 classes, 504
# crops; InternVL's layer-decay optimizer and schedule. Used by search_spaces/fewshot.yaml.
_base_ = ['./_base_/datasets/ade20k_504.py', './_base_/default_runtime.py']
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    pretrained=None,
    backbone=dict(
        type='InternViT6B', preset='6B', pretrain_size=224, img_size=504, patch_size=14,
        drop_path_rate=0.0, init_values=0.1, with_cp=True, use_flash_attn=True,
        layerscale_force_fp32=False, freeze_vit=True, out_indices=[47],
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
optimizer = dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05,
                 constructor='CustomLayerDecayOptimizerConstructor',
                 paramwise_cfg=dict(num_layers=48, layer_decay_rate=0.95))
optimizer_config = dict()
lr_config = dict(policy='poly', warmup='linear', warmup_iters=1500, warmup_ratio=1e-6,
                 power=1.0, min_lr=0.0, by_epoch=False)
runner = dict(type='IterBasedRunner', max_iters=80000)
checkpoint_config = dict(by_epoch=False, interval=8000, max_keep_ckpts=2)
evaluation = dict(interval=8000, metric='mIoU', pre_eval=True, save_best='mIoU')
dist_params = dict(backend='nccl')
seed = 0
custom_hooks = [dict(type='ToBFloat16Hook', priority=49)]
