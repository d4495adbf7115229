"""Ray Tune writes its experiment state (``experiment_state-*.json``) in place, and a full disk
or a kill mid-write leaves it torn (the search algorithm's file too, seen on a full tmpfs):
``--resume`` then restores trials without their configs. At every save of Tune's, the files
that read whole are copied beside them (``<file>.whole``: one save behind at most); a resume
puts a torn one's copy back.
"""
import glob
import json
import os
import os.path as osp
import pickletools
import shutil

from ray.tune import Callback

STATE_FILES = ('experiment_state-*.json', 'basic-variant-state-*.json', 'searcher-state-*.pkl')
WHOLE = '.whole'


def _whole(data):
    """True when ``data`` parses: Tune's JSON, or a search algorithm's pickle (its opcodes read
    to STOP; nothing is executed)."""
    if not data:
        return False
    try:
        json.loads(data)
        return True
    except ValueError:
        pass
    try:
        for _ in pickletools.genops(data):
            pass
        return True
    except Exception:
        return False


def _read(path):
    with open(path, 'rb') as f:
        return f.read()


def _state_files(experiment_path):
    return [p for pattern in STATE_FILES for p in glob.glob(osp.join(experiment_path, pattern))]


class KeepTuneState(Callback):
    """Tune asks its callbacks for their state at each of its saves (TuneController
    .save_to_dir): that is when the copies are refreshed. Nothing of its own to save."""

    def __init__(self, experiment_path):
        self.experiment_path = experiment_path
        self._copied = {}  # path -> the mtime copied

    def get_state(self):
        for path in _state_files(self.experiment_path):
            tmp = f'{path}{WHOLE}.tmp'
            try:
                mtime = os.stat(path).st_mtime_ns
                if self._copied.get(path) == mtime:
                    continue
                data = _read(path)  # read once: the bytes checked are the bytes kept
                if not _whole(data):
                    continue
                with open(tmp, 'wb') as f:
                    f.write(data)
                os.replace(tmp, path + WHOLE)
                self._copied[path] = mtime
            except OSError:  # a full disk: the previous copy stays
                if osp.exists(tmp):
                    os.remove(tmp)
        return None


def restore_torn(experiment_path):
    """Before --resume: each state file that does not read whole is replaced by its copy.
    Returns the file names restored."""
    restored = []
    for copy in glob.glob(osp.join(experiment_path, '*' + WHOLE)):
        path = copy[:-len(WHOLE)]
        if not (osp.isfile(path) and _whole(_read(path))) and _whole(_read(copy)):
            shutil.copyfile(copy, path)
            restored.append(osp.basename(path))
    return restored
