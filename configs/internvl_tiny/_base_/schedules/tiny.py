# Two iterations and one evaluation: enough to run every step of a family's recipe.
optimizer = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005)
optimizer_config = dict()
lr_config = dict(policy='poly', power=0.9, min_lr=1e-4, by_epoch=False)
runner = dict(type='IterBasedRunner', max_iters=2)
checkpoint_config = dict(by_epoch=False, interval=2)
evaluation = dict(interval=2, metric='mIoU', pre_eval=True)
