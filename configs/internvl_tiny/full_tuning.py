# InternVL's full tuning (configs/intern_vit_6b/full_tuning/) at toy size: head tuning with the
# whole InternViT trained (drop path 0.4, layer decay 0.95); the backbone is bf16 before DDP wraps
# it, the heads fp32.
_base_ = ['./head_tuning.py']
model = dict(
    backbone=dict(drop_path_rate=0.4, freeze_vit=False),
    auxiliary_head=dict(in_index=2))
optimizer = dict(paramwise_cfg=dict(num_layers=4, layer_decay_rate=0.95))
