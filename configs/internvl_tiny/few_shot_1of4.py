# InternVL's few-shot protocol (configs/intern_vit_6b/few_shot/, here 1/4 of the data) at toy
# size: the backbone is fine-tuned (drop path 0.4, layer decay 0.95, weight decay 0.05) under a
# linear FCNHead with norm, on max_image_num = N // 4 images; bf16 backbone.
_base_ = ['./_base_/models/linear.py', './_base_/datasets/ade_tiny.py',
          './_base_/default_runtime.py', './_base_/schedules/tiny.py']
deepspeed = False
deepspeed_config = 'zero_configs/adam_zero1_bf16.json'
pretrained = None  # InternVL: './pretrained/intern_vit_6b_224px.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True, type='InternViT6B', pretrain_size=224, img_size=56, patch_size=14,
        embed_dim=64, depth=4, num_heads=4, mlp_ratio=4., qkv_bias=False, drop_path_rate=0.4,
        init_values=0.1, with_cp=True, use_flash_attn=True, qk_normalization=True,
        layerscale_force_fp32=False, freeze_vit=False,
        out_indices=[3],  # InternVL: [47], the last block
        pretrained=pretrained),
    test_cfg=dict(mode='slide', crop_size=(56, 56), stride=(36, 36)))
data = dict(samples_per_gpu=2, train=dict(max_image_num=24 // 4))
optimizer = dict(_delete_=True, type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05,
                 constructor='CustomLayerDecayOptimizerConstructor',
                 paramwise_cfg=dict(num_layers=4, layer_decay_rate=0.95))
lr_config = dict(_delete_=True, policy='poly', warmup='linear', warmup_iters=1,
                 warmup_ratio=1e-6, power=1.0, min_lr=0.0, by_epoch=False)
runner = dict(type='IterBasedRunner')
if deepspeed:
    checkpoint_config = dict(deepspeed=deepspeed, by_epoch=False, interval=2, max_keep_ckpts=2)
else:
    checkpoint_config = dict(by_epoch=False, interval=2, max_keep_ckpts=2)
evaluation = dict(interval=2, metric='mIoU', save_best='auto')
custom_hooks = [dict(type='ToBFloat16Hook', priority=49)]
