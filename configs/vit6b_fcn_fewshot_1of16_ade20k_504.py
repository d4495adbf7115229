# InternVL's few-shot setting at 1/16 of ADE20K's 20210 training images: the fine-tuned protocol
# of vit6b_fcn_fewshot_ade20k_504.py trained 5k iterations (100 warmup) on max_image_num = 1263
# images (InternVL's key; the kept images are the first 1263 of a permutation seeded by the run's
# seed, the same in every rank). Sweeps use `fewshot.fraction` instead, which does the same by
# fraction and derives iterations and warmup (search_spaces/fewshot.yaml).
_base_ = ['./vit6b_fcn_fewshot_ade20k_504.py']
data = dict(train=dict(max_image_num=20210 // 16))
runner = dict(type='IterBasedRunner', max_iters=5000)
lr_config = dict(warmup_iters=100)
