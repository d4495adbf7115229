"""Beyond one machine: the resource plan (pure: computed from per-node resources), and real
sweeps on a two-node Ray cluster — the session's head plus a second `ray start --address` node
with a logical GPU — read back from MLflow's placement tags."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import cli
from orchestrator.errors import ConfigError
from orchestrator.plan import resource_plan
from orchestrator.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name('ray'))


DEMO_SPEC = load_spec(ROOT / 'search_spaces' / 'demo.yaml')[0]


def _spec(workers, cpus=1, gpus=0, cap=None):
    return DEMO_SPEC.replaced('resources', workers_per_trial=workers, cpus_per_worker=cpus,
                              gpus_per_worker=gpus, max_concurrent_trials=cap)


def _node(name, cpu, gpu=0):
    return dict(name=name, resources={'CPU': float(cpu), 'GPU': float(gpu)})


def test_plan_counts_whole_workers_per_node():
    # 8-GPU trials on two 8-GPU nodes with 64 CPUs: one trial per node, CPUs do not limit
    nodes = [_node('a', 64, 8), _node('b', 64, 8), _node('cpu-only', 96)]
    trials, lines = resource_plan(_spec(8, cpus=4, gpus=1), nodes)
    assert trials == 2
    assert any('cpu-only' in line and '-> 0 worker(s)' in line for line in lines)
    # 3 GPUs on one node and 5 on another still host one 8-worker trial (it spans them)
    assert resource_plan(_spec(8, cpus=1, gpus=1), [_node('a', 8, 3), _node('b', 8, 5)])[0] == 1
    # CPUs bound it: 10 CPUs hold 2 workers of 4 CPUs, not 2.5
    assert resource_plan(_spec(1, cpus=4), [_node('a', 10)])[0] == 2
    assert resource_plan(_spec(1, cpus=1), [_node('a', 16)], )[0] == 16
    assert resource_plan(_spec(1, cpus=1, cap=3), [_node('a', 16)])[0] == 3


def test_plan_packs_fractional_gpus():
    trials, lines = resource_plan(_spec(1, cpus=1, gpus=0.5), [_node('a', 4, 1)])
    assert trials == 2 and '2 workers share each GPU' in lines[-1]
    assert resource_plan(_spec(1, cpus=1, gpus=0.25), [_node('a', 16, 2)])[0] == 8


@pytest.mark.parametrize('spec,nodes,needle', [
    (_spec(1, gpus=2), [_node('a', 8, 1), _node('b', 8, 1)], 'no node can hold one worker'),
    (_spec(4, gpus=1), [_node('a', 8, 1), _node('b', 8, 2)], 'hold 3 such worker(s)'),
    (_spec(1, cpus=4), [_node('a', 2), _node('b', 3)], 'no node can hold one worker'),
])
def test_impossible_plans_are_refused(spec, nodes, needle):
    with pytest.raises(ConfigError) as e:
        resource_plan(spec, nodes)
    assert needle in str(e.value) and 'could never be scheduled' in str(e.value)


@pytest.fixture(scope='module')
def two_nodes(ray_address):
    """The session's head (2 CPUs) plus a second node (2 CPUs, 1 logical GPU) for this module.
    `ray start --block` keeps the node's processes tied to this Popen: terminating it removes
    the node, so the later test modules see the one-node cluster again."""
    import ray
    node = subprocess.Popen([RAY, 'start', f'--address={ray_address}', '--num-cpus=2',
                             '--num-gpus=1', '--block', '--disable-usage-stats'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ray.init(address=ray_address, log_to_driver=False)
    try:
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n['Alive']]) < 2 and time.time() < deadline:
            time.sleep(0.5)
        alive = [n for n in ray.nodes() if n['Alive']]
        assert len(alive) == 2, alive
        ids = {('gpu' if n['Resources'].get('GPU') else 'head'): n['NodeID'] for n in alive}
    finally:
        ray.shutdown()
    yield ray_address, ids
    node.terminate()
    node.wait(timeout=60)


def _space(tmp, synthetic_root, name, resources, grid):
    space = dict(
        name=name, base_config=str(ROOT / 'configs' / 'tiny_fcn_synthetic.py'),
        data_root=str(synthetic_root),
        parameters={'model.decode_head.num_convs': {'grid': grid}},
        derived={'iterations': {'at_full_data': 40}, 'evaluations': 1},
        resources=resources, tracking={'experiment': name}, output=str(tmp / 'out'))
    path = tmp / f'{name}.yaml'
    path.write_text(yaml.safe_dump(space))
    return path


def _log_span(trial_dir):
    """(first, last) timestamp of the trial's mmseg log, written by its worker as it trained."""
    import datetime
    import re
    stamp = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ')
    stamps = [datetime.datetime.strptime(line[:23], '%Y-%m-%d %H:%M:%S,%f')
              for log in (trial_dir / 'mmseg').glob('*.log')
              for line in log.read_text().splitlines() if stamp.match(line)]
    return min(stamps), max(stamps)


def _children(tmp, name):
    client = MlflowClient('sqlite:///' + str(tmp / 'out' / 'mlflow.db'))
    exp = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([exp.experiment_id])
            if 'mlflow.parentRunId' in r.data.tags]


def test_two_worker_trials_span_both_nodes(two_nodes, synthetic_root, tmp_path, capsys):
    """2 workers x 2 CPUs: each node holds one worker, so every trial spans both nodes."""
    address, ids = two_nodes
    path = _space(tmp_path, synthetic_root, 'span', {'workers_per_trial': 2, 'cpus_per_worker': 2},
                  [0, 1])
    code = cli.main(['sweep', str(path), '--address', address])
    out = capsys.readouterr().out
    assert code == 0, out
    assert '=> 1 concurrent trial(s) (2 of 2 worker slots)' in out
    children = _children(tmp_path, 'span')
    assert len(children) == 2
    for c in children:
        tags = c.data.tags
        assert c.info.status == 'FINISHED' and 0 <= c.data.metrics['mIoU'] <= 1
        assert {tags['worker.0.node_id'], tags['worker.1.node_id']} == set(ids.values())
        assert tags['num_nodes'] == '2'
        assert tags['node_ids'] == ','.join(sorted(ids.values()))
        # the worker on the GPU node was given no GPU (it asked for none)
        assert tags['worker.0.gpu_ids'] == tags['worker.1.gpu_ids'] == ''


def test_half_gpu_trials_share_the_gpu_at_once(two_nodes, synthetic_root, tmp_path, capsys):
    address, ids = two_nodes
    path = _space(tmp_path, synthetic_root, 'shared-gpu',
                  {'workers_per_trial': 1, 'cpus_per_worker': 1, 'gpus_per_worker': 0.5}, [0, 1])
    code = cli.main(['sweep', str(path), '--address', address])
    out = capsys.readouterr().out
    assert code == 0, out
    assert '=> 2 concurrent trial(s)' in out and '2 workers share each GPU' in out
    children = _children(tmp_path, 'shared-gpu')
    assert len(children) == 2
    for c in children:
        assert c.data.tags['worker.0.node_id'] == ids['gpu']  # the head has no GPU
        assert c.data.tags['worker.0.gpu_ids'] == '0'         # Ray's ID of that one GPU
    # they trained at the same time, on the same GPU: the workers' own logs, first to last line
    spans = sorted(_log_span(tmp_path / 'out' / 'shared-gpu' / 'trials' / c.data.tags['trial_id'])
                   for c in children)
    assert spans[1][0] < spans[0][1], spans


@pytest.mark.parametrize('resources,needle', [
    ({'workers_per_trial': 1, 'cpus_per_worker': 16}, 'no node can hold one worker'),
    ({'workers_per_trial': 2, 'gpus_per_worker': 1}, 'hold 1 such worker(s)'),
])
def test_impossible_plan_on_the_cluster_fails_fast(two_nodes, synthetic_root, tmp_path, capsys,
                                                   resources, needle):
    import ray
    address, _ = two_nodes
    path = _space(tmp_path, synthetic_root, 'impossible', resources, [0])
    code = cli.main(['sweep', str(path), '--address', address])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count('\n') == 0 and str(path) in err, err
    assert needle in err and '1 GPU on 2 node(s)' in err, err
    assert not (tmp_path / 'out').exists() and not ray.is_initialized()


def test_a_node_that_left_since_it_was_listed_is_left_out_of_the_storage_check(
        ray_address, tmp_path):
    """A node ray.nodes() still lists as alive but the cluster can no longer schedule on (killed
    a moment ago; here an ID no node has): the check answers for the nodes that are there.
    Before: the driver died with a TaskUnschedulableError traceback (seen in CI, when a test's
    killed node was still listed as the next sweep started)."""
    import ray
    from orchestrator.cluster import check_shared_storage, cluster_nodes
    ray.init(address=ray_address, log_to_driver=False)
    try:
        nodes = cluster_nodes()
        gone = dict(name='192.0.2.99 (0a0a0a0a)', node_id='0a' * 28, resources={'CPU': 2.0})
        assert gone['node_id'] not in {n['NodeID'] for n in ray.nodes()}
        assert check_shared_storage(str(tmp_path), [gone, *nodes], 'space.yaml') == nodes
    finally:
        ray.shutdown()
    assert list(tmp_path.iterdir()) == []  # its marker file removed


def test_dry_run_shows_the_clusters_packing(two_nodes, synthetic_root, tmp_path, capsys):
    address, ids = two_nodes
    path = _space(tmp_path, synthetic_root, 'plan',
                  {'workers_per_trial': 1, 'cpus_per_worker': 1, 'gpus_per_worker': 0.5}, [0, 1])
    assert cli.main(['sweep', str(path), '--dry-run', '--address', address]) == 0
    out = capsys.readouterr().out
    assert f'({ids["gpu"][:8]}): 2 CPU, 1 GPU -> 2 worker(s)' in out
    assert f'({ids["head"][:8]}): 2 CPU, 0 GPU -> 0 worker(s)' in out


def test_an_address_where_no_head_node_answers_is_one_line_exit_2(tmp_path, synthetic_root,
                                                                  capsys):
    """Before: ray.init retried for minutes printing Ray's C++ warnings."""
    import socket

    import ray
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    space = tmp_path / 'space.yaml'
    space.write_text(yaml.safe_dump(dict(
        name='nohead', base_config=str(ROOT / 'configs' / 'tiny_fcn_synthetic.py'),
        data_root=str(synthetic_root), parameters={'model.decode_head.num_convs': {'grid': [1]}},
        resources={'workers_per_trial': 1})))
    code = cli.main(['sweep', str(space), '--address', f'127.0.0.1:{port}',
                     '--output', str(tmp_path / 'out')])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count('\n') == 0, err
    assert f'--address 127.0.0.1:{port}: no Ray head node answers there' in err
    assert 'ray start --head' in err and not ray.is_initialized()
    assert not (tmp_path / 'out').exists()


def test_a_token_cluster_attached_without_the_token_is_one_line_exit_2(tmp_path, synthetic_root,
                                                                       ray_address, cli_env):
    """The session's cluster uses Ray's token authentication; a driver without RAY_AUTH_MODE
    and the token is refused. Before: a ConnectionError traceback."""
    env = {k: v for k, v in cli_env.items() if not k.startswith('RAY_AUTH')}
    env['HOME'] = str(tmp_path)  # and no ~/.ray/auth_token to fall back on
    space = tmp_path / 'space.yaml'
    space.write_text(yaml.safe_dump(dict(
        name='notoken', base_config=str(ROOT / 'configs' / 'tiny_fcn_synthetic.py'),
        data_root=str(synthetic_root), parameters={'model.decode_head.num_convs': {'grid': [1]}},
        resources={'workers_per_trial': 1}, output=str(tmp_path / 'out'))))
    run = subprocess.run([str(Path(sys.executable).with_name('orchestrator')), 'sweep',
                          str(space), '--address', ray_address], env=env, capture_output=True,
                         text=True, timeout=300)
    err = run.stderr.strip()
    assert run.returncode == 2, (run.stdout[-2000:], err[-2000:])
    assert err.count('\n') == 0 and 'Traceback' not in err, err
    assert f'--address {ray_address}: Ray refused the connection' in err
    assert 'RAY_AUTH_MODE=token' in err


def _one_trial(tmp_path, synthetic_root, name):
    space = tmp_path / 'space.yaml'
    space.write_text(yaml.safe_dump(dict(
        name=name, base_config=str(ROOT / 'configs' / 'tiny_fcn_synthetic.py'),
        data_root=str(synthetic_root), parameters={'model.decode_head.num_convs': {'grid': [1]}},
        derived={'iterations': {'at_full_data': 20}, 'evaluations': 1},
        resources={'workers_per_trial': 1, 'cpus_per_worker': 1}, output=str(tmp_path / 'out'))))
    return space


def test_without_an_address_the_sweep_starts_its_own_ray_whatever_the_last_cluster_was(
        tmp_path, synthetic_root, cli_env):
    """Ray's ray.init() without an address joins the cluster named by <temp>/ray/
    ray_current_cluster: a user's own, or a dead one a killed `ray start` left behind. Before,
    a sweep without --address then retried that dead address for minutes (a hang); as the docs
    say, it starts a local cluster of its own, and leaves the file as it was."""
    import shutil
    import socket
    import tempfile
    with socket.socket() as s:  # a port nothing listens on once closed: the dead head's
        s.bind(('127.0.0.1', 0))
        dead = f'127.0.0.1:{s.getsockname()[1]}'
    temp = Path(tempfile.mkdtemp(prefix='rt', dir='/tmp'))  # short: Ray's sockets go under it
    try:
        (temp / 'ray').mkdir()
        (temp / 'ray' / 'ray_current_cluster').write_text(dead)
        env = {k: v for k, v in cli_env.items() if k != 'RAY_ADDRESS'}
        run = subprocess.run([str(Path(sys.executable).with_name('orchestrator')), 'sweep',
                              str(_one_trial(tmp_path, synthetic_root, 'stale'))],
                             env={**env, 'RAY_TMPDIR': str(temp)}, capture_output=True,
                             text=True, timeout=150)  # ~20 s here; before: minutes
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
        assert (temp / 'ray' / 'ray_current_cluster').read_text() == dead
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    client = MlflowClient(f'sqlite:///{tmp_path}/out/mlflow.db')
    runs = client.search_runs([client.get_experiment_by_name('stale').experiment_id])
    assert sorted(r.info.status for r in runs) == ['FINISHED', 'FINISHED']  # parent + trial


# A driver whose SIGTERM comes once its main thread runs the function named ``in_function``
_SIGTERM_IN = """
import os, signal, sys, threading, time
from orchestrator import cli


def running(name):
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back


def stop():
    deadline = time.time() + 120
    while not running(in_function):
        if time.time() > deadline:  # the name changed: say so, not a sweep to its end
            print(f'never in {in_function}', file=sys.stderr, flush=True)
            os._exit(99)
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)


threading.Thread(target=stop, daemon=True).start()
"""


@pytest.mark.parametrize('in_function,token', [
    ('_init_gcs_client', False),  # Ray's connect loop: ~20 retries a second apart, no token
    ('check_shared_storage', True)])  # attached: a task on every node looks for a marker file
def test_sigterm_while_ray_connects_or_checks_is_one_line_exit_143_before_anything_started(
        in_function, token, tmp_path, synthetic_root, ray_address, cli_env):
    """SIGTERM while ray.init retries (a token cluster attached without the token), or after it
    while the storage check runs: exit 143 and one line that nothing started. Before: Ray's
    own handler (sys.exit) ended the driver with exit code 15 and no word."""
    env = dict(cli_env)
    if not token:
        env = {k: v for k, v in cli_env.items() if not k.startswith('RAY_AUTH')}
        env['HOME'] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    space = _one_trial(tmp_path, synthetic_root, 'connecting')
    argv = ['sweep', str(space), '--address', ray_address]
    script = f'in_function = {in_function!r}\n{_SIGTERM_IN}sys.exit(cli.main({argv!r}))\n'
    run = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                         text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 143, (run.stdout + run.stderr)[-3000:]
    assert run.stdout.strip() == ('interrupted by SIGTERM before the sweep started: nothing '
                                  'was started; run the same command again'), run.stdout[-2000:]
    assert 'Traceback' not in run.stderr
    assert not list(tmp_path.glob('out/*'))  # no sweep directory (the storage check's root)
