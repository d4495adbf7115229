"""Tensors kept by key in directories the processes of one node share (a tmpfs, then local disk),
each within a budget of bytes: the validation feature cache's store (hooks/val_features.py).

A tier is ``[base, bytes]``: its directory is ``<base>/<name>`` (``base`` None: this process's
temp directory, as the node sees it). The directory is this user's alone (mode 0700, checked:
a directory another user made first, or a link, is not used), so nobody else can read the
features or plant an entry. An entry is written under a temporary name and renamed: readers need
no lock. What the entries hold is counted in a ``usage`` file under an flock, once per key. A
store never fails its caller: an entry that cannot be read is a miss, a tier that cannot be
written (full, gone, not ours) is left alone for the rest of the run.
"""
import contextlib
import fcntl
import os
import os.path as osp
import shutil
import socket
import stat
import tempfile

import torch

USAGE = 'usage'  # a tier's bytes in entries, as the processes that wrote them counted
FILL_LIMIT = 0.5  # a tier's filesystem is never filled past half (a tmpfs is RAM; NCCL,
# DataLoader workers and Ray use /dev/shm too)


def tier_dirs(name, tiers):
    """[(directory, budget in bytes)] of ``tiers`` ([[base or None, bytes], ...])."""
    return [(osp.join(_base(base), name), int(budget)) for base, budget in tiers if budget > 0]


def drop(name, tiers):
    """Remove the store's directories on this node (the sweep ended)."""
    for base, budget in tiers:
        directory = osp.join(_base(base), name)
        if budget > 0 and _ours(_base(base), name):
            shutil.rmtree(directory, ignore_errors=True)


def _base(base):
    return base or tempfile.gettempdir()


def _levels(base, name):
    parts = name.split(os.sep)
    return [osp.join(base, *parts[:i + 1]) for i in range(len(parts))]


def _safe_base(base):
    """Nobody else can swap a directory in ``base``: not writable by others, or sticky (as
    /tmp and /dev/shm are)."""
    try:
        st = os.stat(base)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and (st.st_mode & stat.S_ISVTX or st.st_uid in
                                           (0, os.getuid()) and not st.st_mode & 0o022))


def _ours(base, name):
    """Every directory of ``name`` under a safe ``base`` exists, is this user's, no link, and
    nobody else may write, read or enter it (so nobody can swap or plant what is below)."""
    if not _safe_base(base):
        return False
    for level in _levels(base, name):
        try:
            st = os.lstat(level)
        except OSError:
            return False
        if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
                or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO)):
            return False
    return True


def _make(base, name):
    """The directories of ``name`` under ``base``, each made with mode 0700 (one of this
    user's made with a wider mode is narrowed to it); whether they are ours. ``base`` is made
    as any directory is, where missing."""
    with contextlib.suppress(OSError):
        os.makedirs(base, exist_ok=True)
    for level in _levels(base, name):
        with contextlib.suppress(OSError):
            os.mkdir(level, 0o700)
        with contextlib.suppress(OSError):  # ours, not a link: narrowed through its own fd
            fd = os.open(level, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_uid == os.getuid():
                    os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
    return _ours(base, name)


class FeatureStore:
    """Entries by key, first tier first (see the module's docstring)."""

    def __init__(self, name, tiers):
        self.tiers = [(osp.join(_base(base), name), int(budget)) for base, budget in tiers
                      if budget > 0 and _make(_base(base), name)]
        self.full = set()  # tiers this process found full, gone or unwritable
        self.reads = self.writes = self.misses = 0

    def get(self, key):
        for directory, _ in self.tiers:
            path = osp.join(directory, key)
            try:
                entry = torch.load(path, map_location='cpu', weights_only=True)
            except (OSError, MemoryError):  # not there, or not readable just now: computed
                continue
            except Exception:  # torn (torch.load raises many kinds): computed again and
                with contextlib.suppress(OSError):  # written again (its bytes stay counted:
                    os.remove(path)  # a small drift)
                continue
            self.reads += 1
            return entry
        self.misses += 1
        return None

    def put(self, key, entry):
        """Keep ``entry`` (a dict with its CPU tensors in a list at ``'tensors'``) under ``key``
        in the first tier with room; the tier's directory, or None. The entry is written, then,
        under the tier's lock, renamed into place and counted, unless another process kept the
        key meanwhile."""
        size = sum(t.numel() * t.element_size() for t in entry['tensors'])
        for directory, budget in self.tiers:
            if directory in self.full:
                continue
            tmp = osp.join(directory, f'.{key}.{socket.gethostname()}.{os.getpid()}.tmp')
            try:
                with _usage(directory) as (used, _):
                    disk = shutil.disk_usage(directory)  # before writing: a full tier costs
                    if (used + size > budget  # no write
                            or disk.used + size > FILL_LIMIT * disk.total):
                        self.full.add(directory)
                        continue
                torch.save(entry, tmp)
                with _usage(directory) as (used, count):
                    final = osp.join(directory, key)
                    if osp.exists(final):
                        os.remove(tmp)
                        return directory
                    disk = shutil.disk_usage(directory)
                    if used + size > budget or disk.used > FILL_LIMIT * disk.total:
                        os.remove(tmp)
                        self.full.add(directory)
                        continue
                    os.replace(tmp, final)
                    count(used + size)
                self.writes += 1
                return directory
            except Exception:  # full (torch.save raises RuntimeError), gone, unwritable
                self.full.add(directory)
                with contextlib.suppress(Exception):
                    os.remove(tmp)
        return None


@contextlib.contextmanager
def _usage(directory):
    """Under the tier's lock: (bytes counted, a function that sets them)."""
    fd = os.open(osp.join(directory, USAGE), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, 'r+') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        text = f.read()

        def count(n):
            f.seek(0)
            f.truncate()
            f.write(str(n))
        yield int(text or 0), count
