"""The files one process of a sweep writes and another reads, declared once: each a dataclass
with its file name and shape, written whole (a temporary name, then renamed: a reader sees the
old file or the new one) with a version, and read back by one function. Readers of a file a
newer version of this program wrote refuse it in one line rather than misread it.

  plan.json            <sweep>/            the driver -> status (the SweepPlan's summary)
  tracking.json        <sweep>/            the driver -> sync, report, compare, best, resume
  trial.json           <sweep>/trials/<id>/  a trial -> the reader of its directory: its plan row
  placement.json       <sweep>/trials/<id>/  a trial -> its MLflow tags, status, a resume
  restarts.jsonl       <sweep>/trials/<id>/  a trial -> status (one Restart a line, appended)
  group.json           <sweep>/groups/<id>/  the worker pool -> the driver's --resume

(A trial's ``mmseg/metrics.jsonl`` is written by mmseg_custom's evaluation hooks, which load
without the orchestrator: its shape is theirs, EvalMetricsHook's.)
"""
import json
import os.path as osp
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Optional

from orchestrator.errors import ConfigError
from orchestrator.files import append_whole, read_jsonl, write_json_atomic

VERSION = 1


class _Record:
    NAME: ClassVar[str]
    UNSET_AS_NULL: ClassVar[bool] = True  # False: an unset field is left out of the file

    def as_dict(self):
        """Its fields, less those left unset (None): the dict a reader tests keys of."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def write(self, folder):
        """Its fields (an unset one as null, or left out: UNSET_AS_NULL), and the version."""
        fields_ = asdict(self) if self.UNSET_AS_NULL else self.as_dict()
        write_json_atomic(osp.join(folder, self.NAME), dict(fields_, version=VERSION))

    @classmethod
    def parse(cls, data, path):
        if not isinstance(data, dict):
            raise ValueError(f'{path}: not a record')
        if data.get('version', VERSION) > VERSION:
            raise ConfigError(f'{path}: version {data["version"]}, written by a newer '
                              f'orchestrator (this one reads version {VERSION})')
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def raw(cls, folder):
        """The file's JSON object as written ({} when there is none, or a torn one): what a
        check of its format (its version) reads."""
        try:
            with open(osp.join(folder, cls.NAME)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @classmethod
    def read(cls, folder):
        """The record in ``folder``, or None when there is none (or it cannot be read: a file
        from a crash before this program wrote it whole)."""
        path = osp.join(folder, cls.NAME)
        data = cls.raw(folder)
        if not data:
            return None
        try:  # a newer version's file raises its ConfigError: said, not taken for none
            return cls.parse(data, path)
        except TypeError:  # a field missing (or a version that is no number): not whole
            return None

    @classmethod
    def require(cls, folder, what):
        """The record in ``folder``; a ConfigError (one line: the path, ``what`` it means)
        when there is none."""
        record = cls.read(folder)
        if record is None:
            raise ConfigError(f'{osp.join(folder, cls.NAME)}: missing or unreadable: {what}')
        return record


@dataclass
class PlanSummary(_Record):
    """What ``status`` needs of the SweepPlan: the trial count, how many train at once, the
    metric, the searched keys (shown per trial), and who drives the sweep."""
    NAME: ClassVar[str] = 'plan.json'
    total_trials: int
    concurrent: int
    metric: str
    searched: list
    driver_pid: int
    driver_host: str


@dataclass
class TrackingMeta(_Record):
    """Where the sweep's MLflow runs are (the journal's store, experiment, and the sweep's id)."""
    NAME: ClassVar[str] = 'tracking.json'
    tracking_uri: str
    experiment: str
    sweep_uid: str


@dataclass
class TrialRow(_Record):
    """The SweepPlan row a Tune trial trains: its index (None: a trial Tune proposed, Optuna's),
    its searched values (those Tune drew included) and planned iterations."""
    NAME: ClassVar[str] = 'trial.json'
    values: dict
    iterations: int
    index: Optional[int] = None


@dataclass
class Placement(_Record):
    """Where each rank of a trial's latest attempt runs (node id and IP, GPU ids) and the trial
    group it trains in (``{'id', 'size'}``; None: alone)."""
    NAME: ClassVar[str] = 'placement.json'
    ranks: list
    group: Optional[dict] = None


@dataclass
class GroupRecord(_Record):
    """A trial group's run: its key and members; ``parent``: the group whose half it is (after
    that one ran out of GPU memory), ``split``: each member's half (None: alone) of a group
    that was split, ``out_of_memory``: how many heads it held when it ran out."""
    NAME: ClassVar[str] = 'group.json'
    UNSET_AS_NULL: ClassVar[bool] = False  # a key is there once set (the pool tests for it)
    key: str
    members: list
    parent: Optional[str] = None
    split: Optional[dict] = None
    out_of_memory: Optional[int] = None


@dataclass
class Restart(_Record):
    """One restart of a trial after its workers were lost: when, which of how many, the
    iteration lost and the one training resumed from, and why."""
    NAME: ClassVar[str] = 'restarts.jsonl'
    at: float
    restart: int
    of: int
    lost_at: Optional[int]
    resume_from: int
    reason: str

    def append(self, folder):
        append_whole(osp.join(folder, self.NAME),
                     json.dumps(dict(asdict(self), version=VERSION)) + '\n')

    @classmethod
    def read_all(cls, folder):
        path = osp.join(folder, cls.NAME)
        return [cls.parse(r, path) for r in read_jsonl(path)] if osp.isfile(path) else []
