"""Files mmcv writes are whole or absent: its ``disk`` file backend, replaced.

mmcv writes a checkpoint by ``open(path, 'wb').write(...)``: a process killed mid-write (a
preempted node) or a disk that fills up leaves a truncated ``iter_N.pth`` under the name a
resume reads, and the trial fails on resume with ``PytorchStreamReader failed reading zip
archive``. Here every ``put`` goes to a temporary name in the same directory, is flushed to the
disk (fsync) and renamed over the target, so the old file (or none) stays until the new one is
complete; a failed write removes its temporary file. Registered under mmcv's own name
(``FileClient.register_backend('disk', ..., force=True)``), as our FCNHead replaces mmseg's.
"""
import os
import os.path as osp

from mmcv.fileio.file_client import FileClient, HardDiskBackend


def write_atomic(path, data, mode='wb', encoding=None):
    """Write ``data`` to ``path`` through a temporary name, flushed, then renamed."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, mode, encoding=encoding) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


class AtomicHardDiskBackend(HardDiskBackend):
    """mmcv's local-disk backend whose writes are atomic."""

    def put(self, obj, filepath):
        write_atomic(str(filepath), obj)

    def put_text(self, obj, filepath, encoding='utf-8'):
        write_atomic(str(filepath), obj, 'w', encoding)


FileClient.register_backend('disk', AtomicHardDiskBackend, force=True)
