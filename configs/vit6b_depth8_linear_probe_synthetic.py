# `make gpu-sweep`'s model (search_spaces/gpu_sweep.yaml): InternVL's linear probe
# (vit6b_fcn_linear_probe_ade20k_504.py: frozen bf16 InternViT-6B width, FCNHead on 150 classes at
# 504 px crops, slide evaluation) cut to its first 8 of 48 blocks (block 7's output, 0.99 B
# parameters), so that a sweep of 24 heads fits a GPU machine's few minutes. Frozen: no
# activation checkpointing (nothing to recompute).
_base_ = ['./vit6b_fcn_linear_probe_ade20k_504.py']
model = dict(backbone=dict(depth=8, out_indices=[7], with_cp=False,
                           pretrained='work_dirs/gpu_sweep/vit6b_depth8.pth'))
optimizer = dict(paramwise_cfg=dict(num_layers=8))
