"""The files processes exchange (orchestrator/records.py): what one writes the other reads back
whole, a torn file reads as none, a newer program's file is refused in one line."""
import json

import pytest

from orchestrator.errors import ConfigError
from orchestrator.records import (GroupRecord, Placement, PlanSummary, Restart, TrackingMeta,
                                  TrialRow)


def test_each_record_reads_back_what_was_written(tmp_path):
    written = [
        PlanSummary(total_trials=2, concurrent=1, metric='mIoU', searched=['a'], driver_pid=7,
                    driver_host='h'),
        TrialRow(index=None, values={'a': 1, 'b': 0.5}, iterations=4),
        TrackingMeta('sqlite:///x.db', 'e', 'uid'),
        Placement(ranks=[dict(node_id='n', node_ip='1.2.3.4', gpu_ids=['0'])],
                  group=dict(id='g', size=2)),
        GroupRecord(key='{"f": 0.5}', members=['t1', 't2'], split={'t1': 'g.1', 't2': None},
                    out_of_memory=2)]
    for record in written:
        folder = tmp_path / type(record).__name__
        folder.mkdir()
        record.write(folder)
        assert type(record).read(folder) == record
        on_disk = json.loads((folder / record.NAME).read_text())
        assert on_disk['version'] == 1 and not [f for f in folder.iterdir()
                                                if f.name != record.NAME]  # no temporary left


def test_unset_fields_keep_each_files_format(tmp_path):
    """A trial alone has ``"group": null`` in its placement.json; a group that is no half of
    another, nor split, nor out of memory, has none of those keys in its group.json (the pool
    tells them apart by the keys' presence), and reads them back as None."""
    Placement(ranks=[]).write(tmp_path)
    assert json.loads((tmp_path / 'placement.json').read_text())['group'] is None
    GroupRecord(key='k', members=['a', 'b']).write(tmp_path)
    assert set(json.loads((tmp_path / 'group.json').read_text())) == {'key', 'members', 'version'}
    read = GroupRecord.read(tmp_path)
    assert read.parent is None and set(read.as_dict()) == {'key', 'members'}


def test_a_torn_or_missing_file_reads_as_none(tmp_path):
    assert Placement.read(tmp_path) is None
    (tmp_path / 'placement.json').write_text('{"ranks": [{"node_id": "n"')
    assert Placement.read(tmp_path) is None


def test_a_required_record_that_is_missing_is_one_line_naming_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r'tracking\.json: missing or unreadable: not a sweep'):
        TrackingMeta.require(tmp_path, 'not a sweep directory')
    TrackingMeta('u', 'e', 's').write(tmp_path)
    assert TrackingMeta.require(tmp_path, 'x').sweep_uid == 's'


def test_a_newer_programs_file_is_refused_with_its_path(tmp_path):
    (tmp_path / 'plan.json').write_text(json.dumps(dict(
        version=2, total_trials=1, concurrent=1, metric='mIoU', searched=[], driver_pid=1,
        driver_host='h')))
    with pytest.raises(ConfigError, match=r'plan\.json: version 2, written by a newer'):
        PlanSummary.read(tmp_path)


def test_restarts_append_whole_lines_and_a_torn_last_line_is_left_out(tmp_path):
    first = Restart(at=1.0, restart=1, of=2, lost_at=7, resume_from=5, reason='node lost')
    first.append(tmp_path)
    Restart(at=2.0, restart=2, of=2, lost_at=None, resume_from=0, reason='x').append(tmp_path)
    with open(tmp_path / 'restarts.jsonl', 'a') as f:
        f.write('{"at": 3.0, "rest')  # a write cut short by a kill
    read = Restart.read_all(tmp_path)
    assert read[0] == first and [r.restart for r in read] == [1, 2]
    assert read[1].lost_at is None
