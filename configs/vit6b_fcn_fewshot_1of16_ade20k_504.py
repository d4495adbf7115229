# InternVL's few-shot setting at 1/16 of ADE20K's 20210 training images: the linear probe of
# vit6b_fcn_linear_probe_ade20k_504.py trained 5k iterations on a fixed subset. `max_image_num`
# is InternVL's own key; here it keeps the first 1263 images of a seeded permutation (the same
# subset in every process and run). Sweeps use `fewshot.fraction` instead, which does the same
# by fraction and also derives the iterations (search_spaces/fewshot.yaml).
_base_ = ['./vit6b_fcn_linear_probe_ade20k_504.py']
data = dict(train=dict(max_image_num=20210 // 16))
runner = dict(type='IterBasedRunner', max_iters=5000)
lr_config = dict(warmup_iters=100)
checkpoint_config = dict(by_epoch=False, interval=1000, max_keep_ckpts=2)
evaluation = dict(interval=1000)
