# Frozen-backbone probing at toy size: the tiny config's FCNHead on a tiny InternViT (depth 2,
# width 64, patch 8, random weights, frozen) instead of the trained TinyCNN, on generated
# ADE-layout data. Trials of this config that differ only in head-side values train as one
# trial group (one backbone pass per batch).
_base_ = ['./tiny_fcn_synthetic.py']
model = dict(
    backbone=dict(_delete_=True, type='InternViT', preset='300M', embed_dim=64, depth=2,
                  num_heads=4, patch_size=8, img_size=64, pretrain_size=64, freeze_vit=True,
                  out_indices=[1]),
    decode_head=dict(in_channels=64, channels=32, norm_cfg=dict(type='SyncBN', requires_grad=True)))
