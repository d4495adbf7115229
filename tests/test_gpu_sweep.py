"""`make gpu-sweep`'s CPU mode: the GPU machine's sweep (search_spaces/gpu_sweep.yaml) at toy size
through `orchestrator sweep` and `orchestrator report`, on the session's Ray cluster (2 CPUs).
What it must show there, checked here from MLflow's store and the sweep's files directly: every
trial trained from the weight file the run wrote, in the trial groups the dry run planned, two
groups at once, and the report covers them all."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_sweep_cpu_mode_runs_the_product_end_to_end(tmp_path, ray_address, cli_env):
    out, work = tmp_path / 'out', tmp_path / 'work'
    run = subprocess.run([sys.executable, 'benchmarks/gpu_sweep.py', '--device', 'cpu',
                          '--out', str(out), '--work', str(work), '--address', ray_address],
                         cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=600)
    log = (out / 'sweep.log').read_text() if (out / 'sweep.log').exists() else ''
    assert run.returncode == 0, run.stderr[-3000:] + log[-3000:]
    assert run.stdout.strip().splitlines()[-1] == str(out / 'gpu_sweep.json')
    result = json.loads((out / 'gpu_sweep.json').read_text())
    assert result['sweep']['exit'] == 0 and result['report']['exit'] == 0
    assert 'Traceback' not in log

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f'sqlite:///{work}/runs/mlflow.db')
    experiment = client.get_experiment_by_name('segprobe-gpu-sweep')
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get('role') == 'trial']
    assert len(trials) == 24  # 3 num_convs x 2 with_norm x 2 concat_input x 2 fractions
    assert all(r.info.status == 'FINISHED' for r in trials)
    assert all(0.0 <= r.data.metrics['mIoU'] <= 1.0 for r in trials)

    # the groups the dry run printed (by its trial numbers and table) are the groups that
    # trained (by the searched values MLflow holds for each trial)
    dry_run = log.split('$ orchestrator sweep')[1]
    table = re.findall(r'^\| (\d+) +\| (\d) +\| (\w+) +\| (\w+) +\| ([\d.]+) +\|', dry_run, re.M)
    values = {int(i): (int(n), w == 'True', c == 'True', float(f)) for i, n, w, c, f in table}
    planned = [sorted(values[int(i)] for i in m.group(1).split(','))
               for m in re.finditer(r'^  group \d+: trials ([\d,]+) ', dry_run, re.M)]
    keys = ('num_convs', 'with_norm', 'concat_input')
    trained = {}
    for r in trials:
        p = r.data.params
        trained.setdefault(r.data.tags['trial_group'], []).append(
            (int(p['model.decode_head.num_convs']),
             *(p[f'model.decode_head.{k}'] == 'True' for k in keys[1:]),
             float(p['fewshot.fraction'])))
    assert len(values) == 24 and len(planned) == 2
    assert sorted(sorted(v) for v in trained.values()) == sorted(planned)

    # two groups trained at once (their runs' times overlap; one CPU each of the cluster's 2)
    spans = [(min(r.info.start_time for r in trials if r.data.tags['trial_group'] == g),
              max(r.info.end_time for r in trials if r.data.tags['trial_group'] == g))
             for g in trained]
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1

    # every group loaded the file the run wrote (and nothing else initialised its backbone)
    weights = work / 'backbone.pth'
    for group in trained:
        text = ''.join(p.read_text() for p in (work / 'runs' / 'gpu-sweep' / 'groups' / group)
                       .glob('*.log'))
        assert f'InternViT weights {weights} (internvl layout)' in text
        assert 'not in the file: none' in text

    report = (out / 'report.md').read_text()
    assert '24 trial(s) completed their schedule' in report


def test_trials_stopped_before_their_group_started_are_not_counted_as_a_group(tmp_path):
    """A SIGTERM at --until can stop trials that never joined a group (no trial_group tag):
    the JSON counts them apart. Before: all of them made one 'group' of size 24."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('gpu_sweep', ROOT / 'benchmarks' /
                                                  'gpu_sweep.py')
    gpu_sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_sweep)

    def trial(group, start, end, status='KILLED'):
        return dict(group=group, start_ms=start, end_ms=end, status=status, mIoU=None)
    trials = [trial('g0', 0, 50, 'FINISHED'), trial('g0', 5, 60, 'FINISHED'),
              trial('g1', 40, 90), trial(None, 10, 20), trial(None, 70, 80)]
    result = gpu_sweep.summary(trials, tmp_path)
    assert result['group_sizes'] == [1, 2] and result['without_group'] == 2
    assert result['groups_running_at_once'] == 2  # g1 started at 40, while g0 ran (0-60)
    assert result['finished'] == 2
