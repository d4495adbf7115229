# InternVL's runtime settings: text and TensorBoard logs, nccl (the worker uses gloo on CPU).
log_config = dict(interval=1, hooks=[dict(type='TextLoggerHook', by_epoch=False),
                                     dict(type='TensorboardLoggerHook')])
dist_params = dict(backend='nccl')
log_level = 'INFO'
load_from = None
resume_from = None
workflow = [('train', 1)]
cudnn_benchmark = True
