"""Ray Tune writes its experiment state (``experiment_state-*.json``) in place, and a full disk
or a kill mid-write leaves it torn (the search algorithm's file too, measured on a full tmpfs):
``--resume`` then restores trials without their configs. After every save of Tune's, the files
that read whole are copied beside them (``<file>.whole``); a resume puts a torn one's copy back.
"""
import glob
import json
import os
import os.path as osp
import pickle
import shutil

from ray.tune import Callback

STATE_FILES = ('experiment_state-*.json', 'basic-variant-state-*.json', 'searcher-state-*.pkl')
WHOLE = '.whole'


def _reads(path):
    """True when the file parses (Tune's JSON, or the search algorithm's pickle)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
        if not data:
            return False
        try:
            json.loads(data)
        except ValueError:
            pickle.loads(data)  # the sweep's own state, as trusted as its tuner.pkl
        return True
    except Exception:
        return False


def _state_files(experiment_path):
    return [p for pattern in STATE_FILES for p in glob.glob(osp.join(experiment_path, pattern))]


class KeepTuneState(Callback):
    """Tune asks its callbacks for their state right after writing its own (TuneController
    .save_to_dir): that is when the copies are refreshed. Nothing of its own to save."""

    def __init__(self, experiment_path):
        self.experiment_path = experiment_path
        self._copied = {}  # path -> the mtime copied

    def get_state(self):
        for path in _state_files(self.experiment_path):
            try:
                mtime = os.stat(path).st_mtime_ns
                if self._copied.get(path) == mtime or not _reads(path):
                    continue
                tmp = f'{path}{WHOLE}.tmp'
                shutil.copyfile(path, tmp)
                os.replace(tmp, path + WHOLE)
                self._copied[path] = mtime
            except OSError:  # a full disk: the previous copy stays
                continue
        return None


def restore_torn(experiment_path):
    """Before --resume: each state file that does not read whole is replaced by its copy.
    Returns the file names restored."""
    restored = []
    for copy in glob.glob(osp.join(experiment_path, '*' + WHOLE)):
        path = copy[:-len(WHOLE)]
        if not _reads(path) and _reads(copy):
            shutil.copyfile(copy, path)
            restored.append(osp.basename(path))
    return restored
