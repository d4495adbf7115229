"""Fault paths of the second robustness round: sweep names that would leave the output root,
files read while they are written, credentials in tracking URIs, a store that refuses the
sweep's experiment. Real MLflow stores, a real Ray cluster."""
import json
import os
from pathlib import Path

import pytest
import yaml

from orchestrator import cli

ROOT = Path(__file__).resolve().parents[1]


def _space(tmp_path, synthetic_root, **extra):
    space = dict(name='r', base_config=str(ROOT / 'configs' / 'tiny_fcn_synthetic.py'),
                 data_root=str(synthetic_root),
                 parameters={'model.decode_head.num_convs': {'grid': [0]}},
                 derived={'iterations': {'at_full_data': 20}, 'evaluations': 1},
                 resources={'workers_per_trial': 1, 'cpus_per_worker': 1},
                 output=str(tmp_path / 'root' / 'inner'))
    space.update(extra)
    path = tmp_path / 'space.yaml'
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.parametrize('name', ['..', '.', '/tmp/elsewhere', 'a/../..'])
def test_a_name_that_leaves_the_output_root_is_refused(name, tmp_path, synthetic_root, capsys):
    path = _space(tmp_path, synthetic_root)
    assert cli.main(['sweep', str(path), '--name', name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and '--name' in err and repr(name) in err
    assert not (tmp_path / 'root').exists()
    assert cli.main(['sweep', str(_space(tmp_path, synthetic_root, name=name))]) == 2
    assert 'name: ' in capsys.readouterr().err and not (tmp_path / 'root').exists()


def test_a_half_written_last_line_is_left_for_later(tmp_path):
    from orchestrator.files import read_jsonl
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"iter": 10, "mIoU": 0.5}\n{"iter": 20, "mI')
    assert read_jsonl(path) == [{'iter': 10, 'mIoU': 0.5}]
    path.write_text('{"iter": 10}\n{"iter": 2\n{"iter": 30}\n')
    with pytest.raises(json.JSONDecodeError):  # damage in the middle is not hidden
        read_jsonl(path)


def test_credentials_in_a_tracking_uri_go_to_mlflows_environment_only(tmp_path, monkeypatch,
                                                                      capsys):
    from orchestrator.journal import TrackingJournal
    for var in ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'):
        monkeypatch.delenv(var, raising=False)
    sweep = tmp_path / 'sweep'
    sweep.mkdir()
    journal = TrackingJournal(str(sweep), 'http://alice:s3cr%21t@127.0.0.1:9/', 'x', 'uid')
    assert journal.tracking_uri == 'http://127.0.0.1:9/'
    assert os.environ['MLFLOW_TRACKING_USERNAME'] == 'alice'
    assert os.environ['MLFLOW_TRACKING_PASSWORD'] == 's3cr%21t'
    journal.save_meta()
    journal.path = str(sweep / 'mlflow_journal.jsonl')
    with open(journal.path, 'w') as f:
        f.write(json.dumps(dict(op='status', status='RUNNING')) + '\n')
    assert cli.main(['sync', str(sweep)]) == 3  # port 9: nothing listens
    out = capsys.readouterr()
    assert 's3cr' not in out.out + out.err and 'alice' not in out.out + out.err
    assert all('s3cr' not in p.read_text() for p in sweep.iterdir())


def test_a_deleted_experiment_of_the_sweeps_name_is_one_line_before_training(
        tmp_path, synthetic_root, ray_address, capsys):
    from mlflow.tracking import MlflowClient
    uri = 'sqlite:///' + str(tmp_path / 'store.db')
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment('r'))
    path = _space(tmp_path, synthetic_root, tracking={'uri': uri, 'experiment': 'r'})
    assert cli.main(['sweep', str(path), '--address', ray_address]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f'error: {path}: tracking.experiment: ') and 'deleted' in err
    assert not (tmp_path / 'root' / 'inner' / 'r' / 'trials').exists()  # nothing trained


def test_one_journal_writer_sync_and_a_second_sweep_wait_for_the_running_one(
        tmp_path, synthetic_root, capsys):
    """While a sweep's driver holds its journal (simulated by holding its lock here), `sync`
    and another sweep of the same directory answer in one line and touch nothing."""
    from orchestrator.journal import TrackingJournal, WriterLock
    path = _space(tmp_path, synthetic_root)
    sweep = tmp_path / 'root' / 'inner' / 'r'
    sweep.mkdir(parents=True)
    journal = TrackingJournal(str(sweep), 'sqlite:///' + str(tmp_path / 'db.sqlite'), 'r', 'u')
    journal.save_meta()
    (sweep / 'mlflow_journal.jsonl').write_text(json.dumps(dict(op='status', status='RUNNING'))
                                                 + '\n')
    def files():
        return sorted((p.name, p.stat().st_mtime) for p in sweep.iterdir()
                      if p.name != 'mlflow_journal.lock')
    before = files()
    with WriterLock().acquire(str(sweep)):
        assert cli.main(['sync', str(sweep)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count('\n') == 0 and 'being written by another process' in err
        assert cli.main(['sweep', str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count('\n') == 0 and err.startswith(f'error: {path}: ')
    assert files() == before


def test_a_resumed_sweeps_restored_callback_writes_through_the_live_journal(tmp_path):
    """Ray Tune restores callbacks from its pickle on --resume: the restored one must write to
    the journal the driver holds now (its --tracking-uri), not a stale copy."""
    import pickle

    from orchestrator.journal import TrackingJournal
    from orchestrator.tracking import MLflowTrialCallback
    old = TrackingJournal(str(tmp_path), 'sqlite:///old.db', 'x', 'uid')
    restored = pickle.loads(pickle.dumps(MLflowTrialCallback(old, 'x', dict, str)))
    TrackingJournal._live.pop(str(tmp_path))  # a new driver process
    now = TrackingJournal(str(tmp_path), 'sqlite:///new.db', 'x', 'uid').register()
    assert restored.journal is now and restored.journal.tracking_uri == 'sqlite:///new.db'
