# InternVL's few-shot protocol on ADE20K (its configs/intern_vit_6b/few_shot/), at the full data:
# the linear probe's head, but the backbone is fine-tuned (block 47's output, drop path 0.4,
# layer decay 0.95, weight decay 0.05), 80k iterations with 1500 warmup. Its 1/16 ... 1/2 configs
# only shorten the schedule (5k ... 40k, warmup 100 ... 800) and set max_image_num = 20210 // k
# (vit6b_fcn_fewshot_1of16_ade20k_504.py; search_spaces/fewshot.yaml derives both from the
# fraction). Published: 46.5 / 50.0 / 53.3 / 55.8 / 57.2 mIoU at 1/16 ... 1/1.
_base_ = ['./vit6b_fcn_linear_probe_ade20k_504.py']
model = dict(backbone=dict(drop_path_rate=0.4, freeze_vit=False, out_indices=[47]))
optimizer = dict(weight_decay=0.05, paramwise_cfg=dict(num_layers=48, layer_decay_rate=0.95))
