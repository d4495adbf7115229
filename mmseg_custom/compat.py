"""mmcv-full 1.7.2 / mmseg 0.30 on torch 2.14: every shim in one place, each with its reason.

``apply()`` is idempotent and runs when ``mmseg_custom`` is imported. Nothing here changes
behaviour on a stack where the original code works; each shim names what broke.
"""
import logging
import time
import warnings

import torch

_applied = False


def apply():
    """Install all shims once per process."""
    global _applied
    if _applied:
        return
    _quiet_deprecations()
    _ddp_forward_without_replicated_tensor_module()
    _ddp_on_cpu()
    _get_stream_takes_device()
    _build_ddp_accepts_cpu()
    _local_checkpoints_load_full_pickle()
    _no_epoch_sleep_when_nothing_can_deadlock()
    _resume_on_cpu()
    _resume_after_the_saved_iteration()
    _applied = True


def _quiet_deprecations():
    # torch's cpp_extension logs "No CUDA runtime is found" when mmcv imports it on a CPU machine.
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
    # mmcv 1.x prints a multi-line "MMCV will release v2.0.0" notice on every import, per worker.
    warnings.filterwarnings('ignore', message='On January 1, 2023, MMCV will release v2.0.0')
    # mmseg's train_segmentor passes broadcast_buffers=False, which torch 2.14 deprecates; the
    # behaviour we rely on is unchanged (BN buffers are broadcast before evaluation instead).
    warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')
    # mmseg's loaders always ask for pin_memory; on a CPU-only run torch warns once per loader.
    warnings.filterwarnings('ignore', message="'pin_memory' argument is set as true")


def _ddp_forward_without_replicated_tensor_module():
    # torch 2.x removed DDP._use_replicated_tensor_module, which mmcv's _run_ddp_forward reads
    # (AttributeError at the first distributed evaluation, multi_gpu_test).
    from mmcv.parallel import MMDistributedDataParallel, scatter_kwargs

    def _run_ddp_forward(self, *inputs, **kwargs):
        device_ids = self.device_ids or [-1]  # -1: unwrap DataContainers onto the CPU
        inputs, kwargs = scatter_kwargs(inputs, kwargs, [device_ids[0]], dim=self.dim)
        return self.module(*inputs[0], **kwargs[0])

    MMDistributedDataParallel._run_ddp_forward = _run_ddp_forward


def _ddp_on_cpu():
    # mmcv's train_step/val_step hand DataContainers to the module unchanged when DDP has no
    # device_ids (CPU/gloo); scattering to device -1 unwraps them as MMDataParallel does on CPU.
    from mmcv.parallel import MMDistributedDataParallel, scatter_kwargs

    for name in ('train_step', 'val_step'):
        original = getattr(MMDistributedDataParallel, name)

        def step(self, *inputs, _original=original, **kwargs):
            if not self.device_ids:
                inputs, kwargs = scatter_kwargs(inputs, kwargs, [-1], dim=self.dim)
                inputs, kwargs = inputs[0], kwargs[0]
            return _original(self, *inputs, **kwargs)

        setattr(MMDistributedDataParallel, name, step)


def _get_stream_takes_device():
    # torch 2.x's _get_stream wants a torch.device; mmcv's Scatter passes an int GPU index
    # (AttributeError: 'int' object has no attribute 'type' on the first GPU batch).
    import mmcv.parallel._functions as functions

    original = functions._get_stream

    def _get_stream(device):
        if isinstance(device, int):
            device = torch.device('cuda', device)
        return original(device)

    functions._get_stream = _get_stream


def _build_ddp_accepts_cpu():
    # mmseg 0.30's build_ddp asserts CUDA ("Only available for cuda or mlu devices"), though
    # MMDistributedDataParallel works on CPU modules over gloo once the shims above are in.
    import mmseg.apis.train as mmseg_train
    import mmseg.utils as mmseg_utils
    from mmcv.parallel import MMDistributedDataParallel

    original = mmseg_utils.build_ddp

    def build_ddp(model, device='cuda', *args, **kwargs):
        if device != 'cpu':
            return original(model, device, *args, **kwargs)
        kwargs.pop('device_ids', None)
        return MMDistributedDataParallel(model.cpu(), *args, device_ids=None, **kwargs)

    mmseg_utils.build_ddp = build_ddp
    mmseg_train.build_ddp = build_ddp


def _local_checkpoints_load_full_pickle():
    # torch >= 2.6 defaults torch.load(weights_only=True); mmcv checkpoints pickle numpy arrays and
    # Python objects in 'meta' (CLASSES, PALETTE, config), so resume/load_from fail. Local files
    # only: they are the user's own checkpoints; remote schemes keep torch's default.
    import os.path as osp

    from mmcv.runner.checkpoint import CheckpointLoader

    @CheckpointLoader.register_scheme(prefixes='', force=True)
    def load_from_local(filename, map_location=None):
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return torch.load(filename, map_location=map_location, weights_only=False)


def _no_epoch_sleep_when_nothing_can_deadlock():
    # mmcv's IterLoader sleeps 2 s at every epoch end against a deadlock while a new epoch's
    # loader worker processes start. Without loader workers, or with persistent ones (mmseg's
    # default: the next epoch reuses the same processes), none start; few-shot subsets have short
    # epochs: measured 24 s of a 40 s tiny run (150 iterations, 12-iteration epochs), and at a
    # 1/16 ADE20K subset with 16 images per step, 2 s every 79 steps (~20 % of a frozen probe).
    from mmcv.runner.iter_based_runner import IterLoader

    def __next__(self):
        try:
            return next(self.iter_loader)
        except StopIteration:
            self._epoch += 1
            if hasattr(self._dataloader.sampler, 'set_epoch'):
                self._dataloader.sampler.set_epoch(self._epoch)
            loader = self._dataloader
            if loader.num_workers > 0 and not getattr(loader, 'persistent_workers', False):
                time.sleep(2)
            self.iter_loader = iter(self._dataloader)
            return next(self.iter_loader)

    IterLoader.__next__ = __next__


def _resume_on_cpu():
    # IterBasedRunner.resume maps the checkpoint to torch.cuda.current_device() unconditionally,
    # so resuming (mmseg's auto_resume after a lost worker or a killed sweep) fails on CPU with
    # "Found no NVIDIA driver". Without CUDA it loads to the CPU instead.
    from mmcv.runner.iter_based_runner import IterBasedRunner
    original = IterBasedRunner.resume

    def resume(self, checkpoint, resume_optimizer=True, map_location='default'):
        if map_location == 'default' and not torch.cuda.is_available():
            map_location = 'cpu'
        return original(self, checkpoint, resume_optimizer, map_location)

    IterBasedRunner.resume = resume


def _resume_after_the_saved_iteration():
    # IterBasedRunner saves in after_train_iter, before it counts the iteration: iter_120.pth
    # records iter=119, so a resumed run trains iteration 120 twice and evaluates (and reports)
    # it twice. Resuming from iter_N.pth now continues with iteration N + 1.
    import os.path as osp
    import re

    from mmcv.runner.iter_based_runner import IterBasedRunner
    original = IterBasedRunner.resume

    def resume(self, checkpoint, *args, **kwargs):
        original(self, checkpoint, *args, **kwargs)
        saved = re.fullmatch(r'iter_(\d+)\.pth', osp.basename(osp.realpath(checkpoint)))
        if saved and int(saved.group(1)) == self._iter + 1:
            self._iter = self._inner_iter = int(saved.group(1))
            self.logger.info(f'continuing after iteration {self._iter}')

    IterBasedRunner.resume = resume
