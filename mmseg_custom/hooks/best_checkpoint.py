"""``BestCheckpointLinkHook``: ``evaluation.save_best`` as a second name of the checkpoint just
written, not a second copy of it.

mmcv's EvalHook saves its best checkpoint by writing the whole model again (InternVL's linear
probe sets ``save_best='mIoU'``; a 6B fine-tune's checkpoint is 35 GB). Its checkpoint hook runs
first (priority NORMAL before LOW) and, with the checkpoint interval at the evaluation interval
(plan.py), has just written ``iter_N.pth``: the best is then a hard link to it, which outlives
``max_keep_ckpts`` removing ``iter_N.pth``. Where that file is absent or the file system has no
hard links, mmcv's own save runs. EvalHook's rule, score and bookkeeping stay its own.
"""
import os
import os.path as osp

from mmcv.runner import HOOKS, Hook


@HOOKS.register_module()
class BestCheckpointLinkHook(Hook):

    def before_run(self, runner):
        from mmseg.core import DistEvalHook, EvalHook
        for hook in runner.hooks:
            if isinstance(hook, (EvalHook, DistEvalHook)) and hook.save_best:
                hook._save_ckpt = self._linking(hook._save_ckpt)

    @staticmethod
    def _linking(save_ckpt):
        def linked(runner, key_score):
            save, own = runner.save_checkpoint, 'save_checkpoint' in vars(runner)

            def link_or_save(out_dir, filename_tmpl, **kwargs):
                written = osp.join(out_dir, f'iter_{runner.iter + 1}.pth')
                best = osp.join(out_dir, filename_tmpl)
                try:
                    os.link(written, best)
                except OSError:  # not written this iteration, or no hard links there
                    save(out_dir, filename_tmpl=filename_tmpl, **kwargs)
            runner.save_checkpoint = link_or_save
            try:
                save_ckpt(runner, key_score)
            finally:  # what it was (FrozenBackboneCheckpointHook puts in its own)
                if own:
                    runner.save_checkpoint = save
                else:
                    del runner.save_checkpoint
        return linked
