# InternVL's head tuning (configs/intern_vit_6b/head_tuning/) at toy size: a frozen InternViT
# whose four block outputs go through its trainable deconvolution pyramid (with_fpn) into
# UPerNet + an auxiliary FCN head; no layer decay; bf16 backbone.
_base_ = ['./_base_/models/upernet.py', './_base_/datasets/ade_tiny.py',
          './_base_/default_runtime.py', './_base_/schedules/tiny.py']
deepspeed = True
deepspeed_config = 'zero_configs/adam_zero1_bf16.json'
pretrained = None  # InternVL: './pretrained/intern_vit_6b_224px.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True, type='InternViT6B', pretrain_size=224, img_size=56, patch_size=14,
        embed_dim=64, depth=4, num_heads=4, mlp_ratio=4., qkv_bias=False, drop_path_rate=0.0,
        init_values=0.1, with_cp=True, use_flash_attn=True, qk_normalization=True,
        layerscale_no_force_fp32=True, with_fpn=True, freeze_vit=True, unfreeze_pos_embed=False,
        out_indices=[0, 1, 2, 3],  # InternVL: [11, 23, 35, 47]
        pretrained=pretrained),
    decode_head=dict(num_classes=150, channels=32, in_channels=[64, 64, 64, 64]),
    auxiliary_head=dict(num_classes=150, channels=32, in_index=1, in_channels=64),
    test_cfg=dict(mode='slide', crop_size=(56, 56), stride=(36, 36)))
optimizer = dict(_delete_=True, type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05,
                 constructor='CustomLayerDecayOptimizerConstructor',
                 paramwise_cfg=dict(num_layers=4, layer_decay_rate=1.0))
lr_config = dict(_delete_=True, policy='poly', warmup='linear', warmup_iters=1,
                 warmup_ratio=1e-6, power=1.0, min_lr=0.0, by_epoch=False)
data = dict(samples_per_gpu=2)
runner = dict(type='IterBasedRunner')
checkpoint_config = dict(deepspeed=deepspeed, by_epoch=False, interval=2, max_keep_ckpts=2)
evaluation = dict(interval=2, metric='mIoU', save_best='auto')
custom_hooks = [dict(type='ToBFloat16Hook', priority=49)]
