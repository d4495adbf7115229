"""Which of a trial's mmseg checkpoints a resume can read.

Checkpoints are written atomically (mmseg_custom/atomic_files.py), but a file can still be cut
short by something outside the process (a copy, a sync, an older run's crash). torch's format is
a zip archive whose directory is at its end: a truncated file has none, which ``zipfile`` sees
without reading the tensors (a 35 GB fine-tune checkpoint is checked in milliseconds). A resume
takes the newest readable ``iter_N.pth``; the unreadable ones are renamed ``*.unreadable`` (kept,
never read again) and said in the trial's log and in ``orchestrator status``.
"""
import json
import os
import os.path as osp
import re
import time
import zipfile

from orchestrator.files import append_whole

SKIPPED = 'skipped_checkpoints.jsonl'  # in the trial's mmseg work dir


def _why_unreadable(path):
    """None when ``path`` is a whole torch zip archive, else why not."""
    try:
        size = osp.getsize(path)
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                end = info.header_offset + len(info.filename) + 30 + info.compress_size
                if end > size:
                    return f'{info.filename} runs past the end of the file ({size} bytes)'
    except (zipfile.BadZipFile, EOFError, ValueError) as e:  # another OSError is not the file's
        return f'{type(e).__name__}: {e}'
    return None


def saved_iterations(work_dir):
    """{iteration: path} of the ``iter_N.pth`` files in ``work_dir``."""
    found = {}
    for name in os.listdir(work_dir) if osp.isdir(work_dir) else []:
        m = re.fullmatch(r'iter_(\d+)\.pth', name)
        if m:
            found[int(m.group(1))] = osp.join(work_dir, name)
    return found


def remove_partial_writes(work_dir):
    """Remove what a killed write left (``*.tmp.<pid>``, mmseg_custom/atomic_files.py): each as
    large as a checkpoint, they would fill the disk restart after restart."""
    for name in os.listdir(work_dir) if osp.isdir(work_dir) else []:
        if re.fullmatch(r'.+\.tmp\.\d+', name):
            os.remove(osp.join(work_dir, name))


def readable_latest(work_dir, set_aside=True):
    """(the newest readable checkpoint's path or None, [(file name, why) skipped]); with
    ``set_aside`` the unreadable newer ones are renamed and recorded in SKIPPED."""
    skipped = []
    for it, path in sorted(saved_iterations(work_dir).items(), reverse=True):
        why = _why_unreadable(path)
        if why is None:
            return path, skipped
        skipped.append((osp.basename(path), why))
        if set_aside:
            os.replace(path, path + '.unreadable')
            append_whole(osp.join(work_dir, SKIPPED), json.dumps(dict(
                at=round(time.time(), 3), file=osp.basename(path), why=why)) + '\n')
    return None, skipped
