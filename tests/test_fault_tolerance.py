"""Faults with real processes on the session's real Ray cluster: a SIGKILLed driver resumed with
--resume, a SIGKILLed training worker, a diverging trial. MLflow is read back each time: one
child per trial, no evaluation logged twice, nothing missing."""
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.driver import HALT_DELAY_ENV

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATOR = str(Path(sys.executable).with_name('orchestrator'))


def _space(tmp, synthetic_root, name, parameters, iters, evaluations, **extra):
    space = dict(
        name=name, base_config=str(ROOT / 'configs' / 'tiny_fcn_synthetic.py'),
        data_root=str(synthetic_root), parameters=parameters,
        derived={'iterations': {'at_full_data': iters}, 'evaluations': evaluations},
        resources={'workers_per_trial': 2, 'cpus_per_worker': 1},
        tracking={'experiment': name}, output=str(tmp / 'out'))
    space.update(extra)
    path = tmp / f'{name}.yaml'
    path.write_text(yaml.safe_dump(space))
    return path


_DRIVERS = []  # this module's sweep drivers: none may outlive its test, pass or fail


@pytest.fixture(autouse=True)
def _no_driver_left():
    yield
    while _DRIVERS:
        driver = _DRIVERS.pop()
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=60)


def _sweep(path, address, env, *flags):
    driver = subprocess.Popen([ORCHESTRATOR, 'sweep', str(path), '--address', address, *flags],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _DRIVERS.append(driver)
    return driver


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    raise AssertionError('timed out')


def _runs(tmp, experiment):
    client = MlflowClient('sqlite:///' + str(tmp / 'out' / 'mlflow.db'))
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if 'mlflow.parentRunId' not in r.data.tags]
    children = [r for r in runs if 'mlflow.parentRunId' in r.data.tags]
    return client, parents, children


def _steps(client, run, key='mIoU'):
    return [m.step for m in sorted(client.get_metric_history(run.info.run_id, key),
                                   key=lambda m: m.step)]


def test_killed_driver_resumes_without_rerunning_or_doubling(tmp_path, synthetic_root,
                                                              ray_address, cli_env):
    path = _space(tmp_path, synthetic_root, 'resume',
                  {'model.decode_head.num_convs': {'grid': [0, 1]}}, iters=240, evaluations=4)
    trials = tmp_path / 'out' / 'resume' / 'trials'
    driver = _sweep(path, ray_address, cli_env)
    # Kill it once one trial has finished and the other has a checkpoint past its start.
    _wait_for(lambda: len(list(trials.glob('*/mmseg/rank_sync.json'))) == 1 and
              len(list(trials.glob('*/mmseg/iter_60.pth'))) == 2, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = next(trials.glob('*/mmseg/rank_sync.json')).parent
    killed_at = time.time()

    resumed = _sweep(path, ray_address, cli_env, '--resume')
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    client, parents, children = _runs(tmp_path, 'resume')
    assert len(parents) == 1 and parents[0].info.status == 'FINISHED'
    assert len(children) == 2 and all(c.info.status == 'FINISHED' for c in children)
    for child in children:  # every evaluation exactly once, none missing
        assert _steps(client, child) == [60, 120, 180, 240], child.data.tags['trial_id']
    # No training iteration is done twice in the finished trial (Tune may not have saved its
    # end before the kill; then it restarts from its final checkpoint and trains nothing), and
    # the killed one continued from its checkpoint instead of from iteration 0.
    def log_of(trial):
        return '\n'.join(p.read_text() for p in sorted(trial.glob('*.log')))
    done_log = log_of(finished)
    assert all(done_log.count(f'Iter [{i}/240]') == 1 for i in range(20, 241, 20)), done_log
    other = next(d for d in trials.glob('*/mmseg') if d != finished)
    log = log_of(other)
    assert 'continuing after iteration' in log and log.count('Iter [240/240]') == 1
    assert log.count('Iter [20/240]') == 1 and log.count('Iter [40/240]') == 1
    print(f'resume: killed -> finished in {time.time() - killed_at:.1f} s')


def test_a_torn_checkpoint_of_an_interrupted_trial_is_skipped_on_resume(
        tmp_path, synthetic_root, ray_address, cli_env):
    """The driver killed, the newest checkpoint of a trial it interrupted cut in half (what a
    crash in mid-copy leaves): --resume finishes that trial from the checkpoint before, and
    `orchestrator status` says which file it set aside."""
    path = _space(tmp_path, synthetic_root, 'torn', {'model.decode_head.num_convs': {'grid': [1]}},
                  iters=240, evaluations=4)
    work = tmp_path / 'out' / 'torn' / 'trials'
    driver = _sweep(path, ray_address, cli_env)
    _wait_for(lambda: len(list(work.glob('*/mmseg/iter_120.pth'))) == 1, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    mmseg = next(work.glob('*/mmseg'))
    newest = max(mmseg.glob('iter_*.pth'), key=lambda p: int(p.stem.split('_')[1]))
    whole = newest.read_bytes()
    newest.write_bytes(whole[:len(whole) // 2])
    resumed = _sweep(path, ray_address, cli_env, '--resume')
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    client, _, (child,) = _runs(tmp_path, 'torn')
    # an evaluation after the checkpoint it resumed from is computed again (the torn one's
    # step: its first record is kept beside the new one)
    steps = _steps(client, child)
    assert child.info.status == 'FINISHED' and sorted(set(steps)) == [60, 120, 180, 240]
    assert all(steps.count(s) == 1 for s in steps if s > int(newest.stem.split('_')[1]))
    status = subprocess.run([ORCHESTRATOR, 'status', str(tmp_path / 'out' / 'torn')],
                            env=cli_env, capture_output=True, text=True, timeout=60)
    assert f'checkpoint {newest.name} could not be read' in status.stdout, status.stdout
    assert (mmseg / f'{newest.name}.unreadable').is_file()


def _last_line(output):
    return output.strip().splitlines()[-1]


def _resume_as_printed(line, tmp, name, env):
    """Run the command the interrupted driver printed; every trial then finishes, with each of
    its evaluations recorded exactly once."""
    command = shlex.split(line.split('resume with: ', 1)[1])
    assert command[:2] == ['orchestrator', 'sweep'] and '--resume' in command
    resumed = subprocess.run([ORCHESTRATOR, *command[1:]], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    client, (parent,), children = _runs(tmp, name)
    assert parent.info.status == 'FINISHED' and len(children) == 2
    for child in children:
        assert child.info.status == 'FINISHED'
        assert _steps(client, child) == [60, 120, 180, 240], child.data.tags['trial_id']


def _one_at_a_time(tmp, synthetic_root, name):
    """Two 2-worker trials of 240 iterations (4 evaluations), one after the other."""
    return _space(tmp, synthetic_root, name, {'model.decode_head.num_convs': {'grid': [0, 1]}},
                  iters=240, evaluations=4, resources={'workers_per_trial': 2,
                                                       'cpus_per_worker': 1,
                                                       'max_concurrent_trials': 1})


def test_sigterm_stops_the_sweep_resumably_and_says_how(tmp_path, synthetic_root, ray_address,
                                                        ray_processes, cli_env):
    """SIGTERM (a preemption) while a trial trains: exit 143, no crash dump, the running trial's
    run KILLED and tagged, nothing of the sweep's left on the cluster, and the printed command
    finishes it. Before: Ray's C++ handler dumped `*** SIGTERM received` and the driver died of
    SIGABRT."""
    path = _one_at_a_time(tmp_path, synthetic_root, 'sigterm')
    trials = tmp_path / 'out' / 'sigterm' / 'trials'
    before = set(ray_processes('ray::TrainWorker'))
    driver = _sweep(path, ray_address, cli_env)
    _wait_for(lambda: list(trials.glob('*/mmseg/iter_60.pth')), driver)
    ours = set(ray_processes('ray::TrainWorker')) - before
    assert len(ours) == 2  # this sweep's crew
    driver.send_signal(signal.SIGTERM)
    signalled = time.time()
    output = driver.communicate(timeout=120)[0]
    print(f'SIGTERM -> driver exited in {time.time() - signalled:.1f} s')
    assert driver.returncode == 143, output[-3000:]
    assert 'Traceback' not in output and 'SIGTERM received' not in output, output[-3000:]
    line = _last_line(output)
    assert line.startswith('interrupted by SIGTERM: 1 trial(s) stopped at their latest '
                           'checkpoint'), output[-3000:]
    client, (parent,), (child,) = _runs(tmp_path, 'sigterm')
    assert parent.info.status == 'KILLED' and child.info.status == 'KILLED'
    assert child.data.tags['interrupted'].startswith('SIGTERM at ')
    assert child.data.tags['trial_id'] in line
    assert 240 not in _steps(client, child)  # it did not finish: nothing says it did
    _gone(ours, ray_processes)
    _resume_as_printed(line, tmp_path, 'sigterm', cli_env)


def _grouped(tmp, synthetic_root, name, **extra):
    """Three heads on one frozen tiny ViT (one trial group on one 2-worker crew), 160
    iterations, evaluated (and checkpointed) every 40."""
    return _space(tmp, synthetic_root, name,
                  {'model.decode_head.num_convs': {'grid': [0, 1, 2]}}, iters=160,
                  evaluations=4, base_config=str(ROOT / 'configs' /
                                                 'tiny_vit_frozen_fcn_synthetic.py'), **extra)


def _continued_as_a_group(tmp, name, client, children, at):
    """Every member finished with each evaluation once in MLflow, trained in one group that
    continued from its members' checkpoints at iteration ``at``: no member trained alone (a
    solo attempt logs into the trial's own directory) and the group trained iteration 20 once."""
    assert len(children) == 3
    for child in children:
        assert child.info.status == 'FINISHED'
        assert _steps(client, child) == [40, 80, 120, 160], child.data.tags['trial_id']
    sweep = tmp / 'out' / name
    assert not list(sweep.glob('trials/*/mmseg/*.log'))
    (group,) = list((sweep / 'groups').iterdir())
    log = '\n'.join(p.read_text() for p in sorted(group.glob('*.log')))
    assert log.count(f'trial group of 3 heads continuing after iteration {at} ') == 1, log[-3000:]
    assert log.count('Iter [20/160]') == 1 and log.count('Iter [160/160]') == 1
    for trial in sweep.glob('trials/*'):
        placement = json.loads((trial / 'placement.json').read_text())
        assert placement['group']['id'] == group.name and placement['group']['size'] == 3


def test_an_interrupted_trial_group_continues_as_a_group_from_its_checkpoints(
        tmp_path, synthetic_root, ray_address, cli_env):
    """SIGTERM while a trial group trains, then the printed --resume: the group continues from
    its heads' checkpoints. Before: every unfinished member trained again alone from
    iteration 0."""
    path = _grouped(tmp_path, synthetic_root, 'groupresume')
    trials = tmp_path / 'out' / 'groupresume' / 'trials'
    driver = _sweep(path, ray_address, cli_env)
    _wait_for(lambda: len(list(trials.glob('*/mmseg/iter_40.pth'))) == 3, driver)
    driver.send_signal(signal.SIGTERM)
    output = driver.communicate(timeout=120)[0]
    assert driver.returncode == 143, output[-3000:]
    # the heads stopped at one iteration (so their checkpoints are one set); before: each as
    # Tune stopped its trial, one iteration apart in 3 of 6 runs here, and a resume then
    # trained a member alone when an evaluation fell between them (a CI failure)
    (log,) = (tmp_path / 'out' / 'groupresume' / 'groups').glob('*/*.log')
    stops = dict(re.findall(r'head (\d): stopped at iteration (\d+)', log.read_text()))
    assert len(stops) == 3 and len(set(stops.values())) == 1, stops
    at = max(int(p.name[5:-4]) for p in trials.glob('*/mmseg/iter_*.pth'))
    command = shlex.split(_last_line(output).split('resume with: ', 1)[1])
    resumed_at = time.time()
    resumed = subprocess.run([ORCHESTRATOR, *command[1:]], env=cli_env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert 'trial groups: 1 continue from their checkpoints' in resumed.stdout
    print(f'group resume: {at} -> finished in {time.time() - resumed_at:.1f} s')
    client, (parent,), children = _runs(tmp_path, 'groupresume')
    assert parent.info.status == 'FINISHED'
    _continued_as_a_group(tmp_path, 'groupresume', client, children, at)


def test_a_trial_group_stopped_before_its_first_evaluation_is_not_recorded_finished(
        tmp_path, synthetic_root, ray_address, cli_env):
    """SIGTERM once the group trains, before its first evaluation (iteration 40; rank 0 held
    before 30): its heads stop together, and its trials wait for Tune to stop them (here 4 s
    later), so every child run is KILLED and the printed --resume trains each head's whole
    schedule. Before, a trial with no evaluation yet counted as done when its head stopped
    with the group: it returned, FINISHED in MLflow with no evaluation, never resumed."""
    # rank 0 stalls 8 s before iteration 30 (each process, once): the stop comes before 40
    base = _with_fault(tmp_path, 'tiny_vit_frozen_fcn_synthetic.py', at_iter=30, stall_s=8)
    path = _space(tmp_path, synthetic_root, 'groupearly',
                  {'model.decode_head.num_convs': {'grid': [0, 1, 2]}}, iters=160,
                  evaluations=4, base_config=str(base))
    groups = tmp_path / 'out' / 'groupearly' / 'groups'
    # Tune stops the trials 4 s after the heads stopped: time for a trial to see its run end
    driver = _sweep(path, ray_address, {**cli_env, HALT_DELAY_ENV: '4'})
    _wait_for(lambda: any('Iter [20/160]' in p.read_text() for p in groups.glob('*/*.log')),
              driver)
    driver.send_signal(signal.SIGTERM)
    output = driver.communicate(timeout=120)[0]
    assert driver.returncode == 143, output[-3000:]
    client, (parent,), children = _runs(tmp_path, 'groupearly')
    assert sorted(c.info.status for c in children) == ['KILLED'] * 3
    assert all(_steps(client, c) == [] for c in children)
    command = shlex.split(_last_line(output).split('resume with: ', 1)[1])
    resumed = subprocess.run([ORCHESTRATOR, *command[1:]], env=cli_env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    client, (parent,), children = _runs(tmp_path, 'groupearly')
    assert parent.info.status == 'FINISHED'
    for child in children:
        assert child.info.status == 'FINISHED'
        assert _steps(client, child) == [40, 80, 120, 160], child.data.tags['trial_id']


def test_a_trial_group_that_lost_a_worker_continues_as_a_group_from_its_checkpoints(
        tmp_path, synthetic_root, ray_address, ray_processes, cli_env):
    """A worker of a trial group's crew SIGKILLed: every member restarts (one restart each,
    from the iteration of its checkpoint) and they train on as one group. Before: each member
    trained again alone from iteration 0."""
    path = _grouped(tmp_path, synthetic_root, 'groupkill',
                    fault_tolerance={'worker_retries': 1})
    trials = tmp_path / 'out' / 'groupkill' / 'trials'
    before = set(ray_processes('ray::TrainWorker'))
    driver = _sweep(path, ray_address, cli_env)
    _wait_for(lambda: len(list(trials.glob('*/mmseg/iter_40.pth'))) == 3, driver)
    (victim, _) = sorted(set(ray_processes('ray::TrainWorker')) - before)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    at = max(int(p.name[5:-4]) for p in trials.glob('*/mmseg/iter_*.pth'))
    output = driver.communicate(timeout=300)[0]
    assert driver.returncode == 0, output[-3000:]
    print(f'group worker kill: -> finished in {time.time() - killed_at:.1f} s')
    client, _, children = _runs(tmp_path, 'groupkill')
    for child in children:
        assert child.data.metrics['restarts'] == 1
        (restart,) = [json.loads(line) for line in
                      (trials / child.data.tags['trial_id'] / 'restarts.jsonl').read_text()
                      .splitlines()]
        assert restart['resume_from'] in (at, at + 40)
    resumed = {json.loads((trials / c.data.tags['trial_id'] / 'restarts.jsonl').read_text())
               ['resume_from'] for c in children}
    assert len(resumed) == 1
    _continued_as_a_group(tmp_path, 'groupkill', client, children, resumed.pop())


def _gone(pids, ray_processes, timeout=60):
    deadline = time.time() + timeout
    while pids & set(ray_processes('ray::TrainWorker')):
        assert time.time() < deadline, 'the crew outlived its driver'
        time.sleep(0.2)


def _journal_records(tmp, name):
    path = tmp / 'out' / name / 'mlflow_journal.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ctrl_c_twice_ends_the_sweep_at_once_and_resumably(tmp_path, synthetic_root, ray_address,
                                                          ray_processes, cli_env):
    """Ctrl-C (SIGINT to the driver's process group), and again once it says it is stopping
    (before or after the first one's close of the runs, as timing has it): exit 130 at once,
    one line with the resume command, no traceback, KILLED in the journal (delivered by the
    resume), the crew gone, and the printed command finishes it.
    Before: the second SIGINT was an exception raised wherever the main thread was; inside a
    garbage-collector callback Python printed it as a traceback and went on."""
    path = _one_at_a_time(tmp_path, synthetic_root, 'sigint')
    trials = tmp_path / 'out' / 'sigint' / 'trials'
    before = set(ray_processes('ray::TrainWorker'))
    driver = subprocess.Popen([ORCHESTRATOR, 'sweep', str(path), '--address', ray_address],
                              env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    _DRIVERS.append(driver)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
    reader.start()
    _wait_for(lambda: list(trials.glob('*/mmseg/iter_60.pth')), driver)
    (training,) = [p.parents[1].name for p in trials.glob('*/mmseg/iter_60.pth')]
    ours = set(ray_processes('ray::TrainWorker')) - before
    os.killpg(driver.pid, signal.SIGINT)
    _wait_for(lambda: any(line.startswith('SIGINT: stopping the trials') for line in lines),
              driver, timeout=30)
    os.killpg(driver.pid, signal.SIGINT)  # the second
    driver.wait(timeout=60)
    reader.join(timeout=10)
    output = ''.join(lines)
    assert driver.returncode == 130, output[-3000:]
    assert 'Traceback' not in output, output[-3000:]
    line = _last_line(output)
    assert line.startswith('interrupted by SIGINT twice: ended at once; 1 trial(s) stopped at '
                           'their latest checkpoint'), output[-3000:]
    assert 'results:' not in output  # no ranked table of half-trained trials
    assert training in line
    journal = _journal_records(tmp_path, 'sigint')
    killed = [r for r in journal if r['op'] == 'status' and r['status'] == 'KILLED']
    assert [r.get('trial_id') for r in killed] == [training, None], journal[-4:]
    _gone(ours, ray_processes)
    _resume_as_printed(line, tmp_path, 'sigint', cli_env)
    _, (parent,), children = _runs(tmp_path, 'sigint')  # what the journal said reached MLflow
    tagged = {c.data.tags['trial_id'] for c in children if 'interrupted' in c.data.tags}
    # 'SIGINT at' when the second one came after the first one's close (it then adds nothing)
    assert tagged == {training} and re.match(r'SIGINT (twice )?at ',
                                             parent.data.tags['interrupted'])


@pytest.fixture
def small_output_disk(small_tmpfs):
    return small_tmpfs('out', '64m')  # where _space puts the sweep's output


def _fill(disk):
    """Write a file until the file system says it is full; returns it."""
    filler = disk / 'filler'
    with open(filler, 'wb') as f:
        try:
            while True:
                f.write(b'\0' * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_output_disk_stops_the_sweep_in_one_line_and_resume_finishes(
        small_output_disk, tmp_path, synthetic_root, ray_address, cli_env):
    """The sweep's output file system fills up while a trial trains: one line naming the path,
    exit 4, no traceback; after the space is freed `--resume` finishes every trial, each
    evaluation recorded once. Before: a 30-line traceback ending in `OSError: [Errno 28] No
    space left on device` from the handler that writes ray.log."""
    path = _space(tmp_path, synthetic_root, 'full',
                  {'model.decode_head.num_convs': {'grid': [0, 1]}}, iters=240, evaluations=4,
                  resources={'workers_per_trial': 2, 'cpus_per_worker': 1,
                             'max_concurrent_trials': 1})
    trials = small_output_disk / 'full' / 'trials'
    driver = _sweep(path, ray_address, cli_env)
    _wait_for(lambda: list(trials.glob('*/mmseg/iter_60.pth')), driver)
    filler = _fill(small_output_disk)
    filled = time.time()
    output = driver.communicate(timeout=180)[0]
    print(f'disk full -> driver exited in {time.time() - filled:.1f} s')
    assert driver.returncode == 4, output[-3000:]
    assert 'Traceback' not in output, output[max(0, output.find('Traceback') - 1500):][:3000]
    line = _last_line(output)
    assert re.match(rf'error: {re.escape(str(small_output_disk))}/\S+: no space left on '
                    r'device; the sweep stopped', line), output[-3000:]

    _, _, children = _runs(tmp_path, 'full')
    assert children and not [c for c in children if c.info.status in ('FAILED', 'FINISHED')]
    filler.unlink()
    _resume_as_printed(line, tmp_path, 'full', cli_env)


@pytest.mark.parametrize('config', ['tiny_fcn_synthetic.py', 'tiny_vit_frozen_fcn_synthetic.py'])
def test_killed_worker_restarts_the_trial_from_its_checkpoint(config, tmp_path, synthetic_root,
                                                               ray_address, ray_processes, cli_env):
    """Also with a frozen backbone, whose checkpoints leave it out: the restart rebuilds it."""
    path = _space(tmp_path, synthetic_root, 'workerkill',
                  {'model.decode_head.num_convs': {'grid': [1]}}, iters=240, evaluations=4,
                  fault_tolerance={'worker_retries': 1},
                  base_config=str(ROOT / 'configs' / config))
    work = tmp_path / 'out' / 'workerkill' / 'trials'
    driver = _sweep(path, ray_address, cli_env)
    _wait_for(lambda: list(work.glob('*/mmseg/iter_120.pth')), driver)
    victims = ray_processes('ray::TrainWorker')
    assert len(victims) == 2  # the sweep's one crew, on this session's cluster
    os.kill(victims[-1], signal.SIGKILL)
    killed_at = time.time()
    output = driver.communicate(timeout=300)[0]
    assert driver.returncode == 0, output[-3000:]
    client, _, children = _runs(tmp_path, 'workerkill')
    (child,) = children
    assert child.info.status == 'FINISHED'
    assert child.data.metrics['restarts'] == 1
    assert _steps(client, child) == [60, 120, 180, 240]
    log = '\n'.join(p.read_text() for p in sorted(next(work.glob('*/mmseg')).glob('*.log')))
    assert log.count('Iter [20/240]') == 1  # restarted from a checkpoint, not from iteration 0
    assert 'continuing after iteration 120' in log and log.count('Iter [240/240]') == 1
    checkpoint = torch.load(next(work.glob('*/mmseg/iter_240.pth')), weights_only=False)
    frozen = config.startswith('tiny_vit_frozen')
    assert frozen == ('frozen_backbone' in checkpoint['meta'])
    assert frozen != any(k.startswith('backbone.') for k in checkpoint['state_dict'])
    # the restart is a line in the live view and in `orchestrator status`
    restart = re.compile(r'trial \w+: worker lost at iteration (\d+); restart 1 of 1 from '
                         r'iteration 120')
    seen = restart.search(output)
    assert seen and 120 <= int(seen.group(1)) < 240, output[-3000:]
    status = subprocess.run([ORCHESTRATOR, 'status', str(tmp_path / 'out' / 'workerkill')],
                            capture_output=True, text=True, env=cli_env).stdout
    assert restart.search(status), status
    print(f'worker restart: killed -> finished in {time.time() - killed_at:.1f} s')


def _tree(pid):
    """The processes below ``pid`` (this test's node), from ps."""
    table = [line.split() for line in subprocess.run(['ps', '-eo', 'pid=,ppid='],
                                                      capture_output=True, text=True)
             .stdout.splitlines()]
    below, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = [int(c) for c, p in table if int(p) == parent]
        below += children
        todo += children
    return below


def _start_node(ray_address, cpus):
    """A node of ``cpus`` CPUs joined to the session's cluster, in its own process group, and
    its Ray node ID once the head lists it."""
    import ray
    ray.init(address=ray_address, log_to_driver=False)
    try:
        before = {n['NodeID'] for n in ray.nodes()}  # a lost node may still be listed alive
    finally:
        ray.shutdown()
    node = subprocess.Popen([str(Path(sys.executable).with_name('ray')), 'start',
                             f'--address={ray_address}', f'--num-cpus={cpus}', '--num-gpus=0',
                             '--block', '--disable-usage-stats'], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ray.init(address=ray_address, log_to_driver=False)
    try:
        def others():  # the node that joined
            return [n for n in ray.nodes() if n['Alive'] and n['NodeID'] not in before]
        deadline = time.time() + 60
        while not others() and time.time() < deadline:
            time.sleep(0.5)
        alive = others()
        assert len(alive) == 1, ray.nodes()
        return node, alive[0]['NodeID']
    except BaseException:
        os.killpg(node.pid, signal.SIGKILL)
        raise
    finally:
        ray.shutdown()


def _lose(node):
    """The machine goes: its `ray start` and every process below it killed at once (_tree)."""
    processes = _tree(node.pid)  # Ray's workers have process groups of their own
    for pid in [node.pid, *processes]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.wait(timeout=30)


@pytest.fixture
def nodes(ray_address):
    """``nodes(cpus)``: extra nodes of the session's cluster, removed at the end if still alive.
    A lost machine is `ray start` and every process below it killed at once (_lose): Ray's
    workers are in process groups of their own, and one that outlived its raylet went on
    training and writing checkpoints into the trial's directory for seconds."""
    started = []

    def start(cpus=2):
        started.append(_start_node(ray_address, cpus))
        return started[-1]
    yield start
    for node, _ in started:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=60)


@pytest.fixture
def extra_node(nodes):
    """A second node (2 CPUs)."""
    return nodes(2)


def test_a_lost_node_restarts_its_trial_from_its_checkpoint_on_the_nodes_left(
        tmp_path, synthetic_root, ray_address, extra_node, cli_env):
    """Two 1-worker trials at once, one per node; the second node dies (SIGKILL of all its
    processes) after its trial's first checkpoint: that trial restarts from the checkpoint on
    the head once the other trial's crew is free (restart 1 of 1; the lost crew's rebuild waits
    for room, and the terminal says so), the sweep exits 0, every evaluation once. Before: the trial FAILED (`The actor ... is unavailable: RpcError`, matched
    by no rule) or waited on its crew's placement group, which no node could hold any more."""
    node, node_id = extra_node
    path = _space(tmp_path, synthetic_root, 'lostnode',
                  {'model.decode_head.num_convs': {'grid': [0, 1]}}, iters=240, evaluations=4,
                  resources={'workers_per_trial': 1, 'cpus_per_worker': 2},
                  fault_tolerance={'worker_retries': 1})
    trials = tmp_path / 'out' / 'lostnode' / 'trials'

    def placed_there():
        for placement in trials.glob('*/placement.json'):
            if json.loads(placement.read_text())['ranks'][0]['node_id'] == node_id:
                return placement.parent
    # the rebuilt crew waits for room (the head's one crew is busy): said after 2 s, not 30
    driver = _sweep(path, ray_address, dict(cli_env, ORCHESTRATOR_ROOM_WAIT_S='2'))
    _wait_for(lambda: placed_there() and list(placed_there().glob('mmseg/iter_60.pth')), driver)
    victim = placed_there()
    _lose(node)
    killed_at = time.time()
    saved = max(int(p.stem.split('_')[1]) for p in (victim / 'mmseg').glob('iter_*.pth'))
    output = driver.communicate(timeout=420)[0]
    print(f'lost node: killed -> sweep finished in {time.time() - killed_at:.1f} s')
    assert driver.returncode == 0, output[-3000:]
    assert re.search(r'^crew \d: waiting for room on the cluster \(1 x ', output, re.M), output
    client, (parent,), children = _runs(tmp_path, 'lostnode')
    assert parent.info.status == 'FINISHED' and len(children) == 2
    for child in children:
        assert child.info.status == 'FINISHED'
        assert _steps(client, child) == [60, 120, 180, 240], child.data.tags['trial_id']
        assert child.data.metrics['restarts'] == (child.data.tags['trial_id'] == victim.name)
    (restart,) = [json.loads(line) for line in (victim / 'restarts.jsonl').read_text().splitlines()]
    assert restart['restart'] == restart['of'] == 1 and restart['resume_from'] == saved
    log = '\n'.join(p.read_text() for p in sorted((victim / 'mmseg').glob('*.log')))
    assert log.count('Iter [20/240]') == 1 and log.count('Iter [240/240]') == 1
    # it finished on the node left
    assert json.loads((victim / 'placement.json').read_text())['ranks'][0]['node_id'] != node_id


def test_a_sweep_whose_crews_no_node_can_hold_any_more_stops_resumable(
        tmp_path, synthetic_root, ray_address, nodes, cli_env):
    """A crew of one 3-CPU worker fits only the extra node (the head has 2 CPUs); that node is
    lost after the trial's first checkpoint. The rebuilt crew can be placed nowhere: after
    ``fault_tolerance.room_timeout_s`` (5 s here) the sweep stops with one line, exit 5, and
    once a node that can hold the crew has joined, the printed --resume finishes it from the
    checkpoint. Before: the trial waited for a crew forever."""
    node, _ = nodes(3)
    path = _space(tmp_path, synthetic_root, 'noroom', {'model.decode_head.num_convs': {'grid': [1]}},
                  iters=240, evaluations=4,
                  resources={'workers_per_trial': 1, 'cpus_per_worker': 3},
                  fault_tolerance={'worker_retries': 1, 'room_timeout_s': 5})
    work = tmp_path / 'out' / 'noroom' / 'trials'
    driver = _sweep(path, ray_address, dict(cli_env, ORCHESTRATOR_ROOM_WAIT_S='2'))
    _wait_for(lambda: list(work.glob('*/mmseg/iter_60.pth')), driver)
    _lose(node)
    killed_at = time.time()
    output = driver.communicate(timeout=300)[0]
    print(f'no room: node lost -> sweep stopped in {time.time() - killed_at:.1f} s')
    assert driver.returncode == 5, output[-3000:]
    line = _last_line(output)
    assert re.fullmatch(
        r"error: no node of the cluster could hold a crew \(1 x \{'CPU': 3\.0\}\) for 5 s "
        r"while trials waited \(the nodes that could are gone, or busy with other work\); "
        r"the sweep stopped: 1 trial\(s\) stopped at their latest "
        r"checkpoint \(\w+\); MLflow runs marked KILLED; add a node that can hold one, then "
        r"resume with: .*", line), output[-3000:]
    assert 'Traceback' not in output
    _, _, (child,) = _runs(tmp_path, 'noroom')  # its MLflow run says what stopped it
    assert child.data.tags['interrupted'].startswith(
        "no node of the cluster could hold a crew (1 x {'CPU': 3.0}) for 5 s while trials "
        'waited (the nodes that could are gone, or busy with other work) at '
    ), child.data.tags['interrupted']
    (trial,) = list(work.iterdir())
    nodes(3)
    command = shlex.split(line.split('resume with: ', 1)[1])
    resumed = subprocess.run([ORCHESTRATOR, *command[1:]], env=cli_env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    client, (parent,), (child,) = _runs(tmp_path, 'noroom')
    assert parent.info.status == child.info.status == 'FINISHED'
    assert _steps(client, child) == [60, 120, 180, 240]
    log = '\n'.join(p.read_text() for p in sorted((trial / 'mmseg').glob('*.log')))
    assert log.count('Iter [20/240]') == 1 and log.count('Iter [240/240]') == 1


def _log_span(trial_dir):
    """(first, last) time stamp of the trial's mmseg logs, written by its rank 0 as it trained."""
    import datetime
    stamps = [datetime.datetime.strptime(line[:23], '%Y-%m-%d %H:%M:%S,%f')
              for log in (trial_dir / 'mmseg').glob('*.log') for line in log.read_text().splitlines()
              if re.match(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ', line)]
    return min(stamps), max(stamps)


def test_a_node_that_joins_while_the_sweep_runs_adds_a_crew(
        tmp_path, synthetic_root, ray_address, nodes, cli_env):
    """One 2-CPU crew fits the head; a 2-CPU node joins after the first trial started: the
    sweep gives it a crew and Tune one more trial at once, so trials train on both nodes at the
    same time. Before: the plan made at the start held (one trial at a time, the node idle)."""
    path = _space(tmp_path, synthetic_root, 'grow',
                  {'model.decode_head.num_convs': {'grid': [0, 1, 2, 3]}}, iters=320,
                  evaluations=2, resources={'workers_per_trial': 1, 'cpus_per_worker': 2})
    trials = tmp_path / 'out' / 'grow' / 'trials'
    driver = _sweep(path, ray_address, cli_env)
    _wait_for(lambda: list(trials.glob('*/placement.json')), driver)
    _, node_id = nodes(2)
    output = driver.communicate(timeout=400)[0]
    assert driver.returncode == 0, output[-3000:]
    assert '=> 1 concurrent trial(s)' in output
    assert re.search(rf'^node [\d.]+ \({node_id[:8]}\) joined the cluster: 2 crews, 2 trials '
                     r'\(or trial groups\) train at once, 1 before$', output, re.M), output[-3000:]
    placed = {t.name: json.loads((t / 'placement.json').read_text())['ranks'][0]['node_id']
              for t in trials.iterdir()}
    there = [t for t, n in placed.items() if n == node_id]
    assert there and len(there) < 4, placed
    # one trial on the new node trained while one on the head did
    spans = {t: _log_span(trials / t) for t in placed}
    assert any(spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
               for a in there for b in placed if b not in there), spans
    client, (parent,), children = _runs(tmp_path, 'grow')
    assert parent.info.status == 'FINISHED'
    assert sorted(c.info.status for c in children) == ['FINISHED'] * 4


def _with_fault(tmp, config='tiny_fcn_synthetic.py', **fault):
    """A tiny config with a FaultInjectionHook (mmseg_custom/hooks/fault_injection.py)."""
    base = tmp / 'faulty.py'
    base.write_text(f"_base_ = [{str(ROOT / 'configs' / config)!r}]\n"
                    f"custom_hooks = [dict(type='FaultInjectionHook', **{fault!r})]\n")
    return base


def _failure_reason(output, errors=''):
    """The reason column of the end-of-sweep table's one failed trial."""
    assert '1 of 1 trials failed' in output, (output + errors)[-3000:]
    rows = [line for line in output.split('1 of 1 trials failed', 1)[1].splitlines()
            if line.startswith('|')]  # its header, then its row
    return rows[1].strip('| ').rsplit(' | ', 1)[1].strip()


def test_a_solo_trial_out_of_gpu_memory_fails_with_the_reason_and_is_not_retried(
        tmp_path, synthetic_root, ray_address, cli_env):
    """torch.cuda.OutOfMemoryError on rank 1 at iteration 10 (injected: raised as torch raises
    it): the trial fails at once with `CUDA out of memory: ...`, not retried as a lost worker
    although retries are left. Before: the reason was `OutOfMemoryError: ...` with the remote
    traceback's text."""
    path = _space(tmp_path, synthetic_root, 'oom', {'model.decode_head.num_convs': {'grid': [1]}},
                  iters=60, evaluations=1,
                  base_config=str(_with_fault(tmp_path, at_iter=10, rank=1, out_of_memory=True)),
                  fault_tolerance={'worker_retries': 2})
    run = subprocess.run([ORCHESTRATOR, 'sweep', str(path), '--address', ray_address],
                         env=cli_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, (run.stdout + run.stderr)[-3000:]
    assert _failure_reason(run.stdout, run.stderr) == ('CUDA out of memory: Tried to allocate 2.00 GiB '
                                           '(injected at iteration 10 on rank 1)'), run.stdout
    assert not list((tmp_path / 'out' / 'oom' / 'trials').glob('*/restarts.jsonl'))


def test_a_trial_group_out_of_gpu_memory_continues_in_halves_and_later_groups_are_smaller(
        tmp_path, synthetic_root, ray_address, cli_env):
    """Six heads planned as two groups of 3 on one crew; a run of more than 2 heads raises
    torch.cuda.OutOfMemoryError before iteration 50 (injected, as torch raises it; after the
    heads' checkpoints at 40). The first group goes on from 40 as a group of 2 and one head
    alone; the second group is planned anew at 2 heads (the third trial alone) and never runs
    out. Before: the group's three trials FAILED with 'CUDA out of memory: ...'."""
    base = _with_fault(tmp_path, 'tiny_vit_frozen_fcn_synthetic.py', at_iter=50, rank=0,
                       out_of_memory=True, heads_above=2)
    path = _space(tmp_path, synthetic_root, 'groupoom',
                  {'model.decode_head.num_convs': {'grid': [0, 1, 2]},
                   'optimizer.lr': {'grid': [0.003, 0.001]}}, iters=80, evaluations=2,
                  base_config=str(base), grouping={'memory_gb': 0.005},
                  resources={'workers_per_trial': 2, 'cpus_per_worker': 1,
                             'max_concurrent_trials': 1})
    run = subprocess.run([ORCHESTRATOR, 'sweep', str(path), '--address', ray_address],
                         env=cli_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    # the plan it started from: two groups of three
    assert 'group 0: trials 0,1,2 (all)' in run.stdout and 'group 1: trials 3,4,5 (all)' in run.stdout
    (split,) = re.findall(r'^trial group (\S+): out of GPU memory.*$', run.stdout, re.M)
    first = split
    assert re.search(
        rf'^trial group {first}: out of GPU memory with 3 heads; they continue from iteration '
        rf'40 as group {first}\.1 \(2 heads\) and 1 alone; later groups of its kind hold at '
        r'most 2 heads$', run.stdout, re.M), run.stdout[-3000:]
    client, (parent,), children = _runs(tmp_path, 'groupoom')
    assert parent.info.status == 'FINISHED' and len(children) == 6
    for child in children:
        assert child.info.status == 'FINISHED'
        assert _steps(client, child) == [40, 80], child.data.tags['trial_id']
        assert child.data.metrics['restarts'] == 0  # not a lost worker
    sweep = tmp_path / 'out' / 'groupoom'
    groups = {g.name: json.loads((g / 'group.json').read_text())
              for g in (sweep / 'groups').iterdir()}
    (second,) = set(groups) - {first, f'{first}.1'}
    assert len(groups[first]['members']) == 3 and groups[first]['out_of_memory'] == 3
    assert groups[f'{first}.1']['parent'] == first
    assert set(groups[f'{first}.1']['members']) < set(groups[first]['members'])
    assert len(groups[second]['members']) == 2 and 'out_of_memory' not in groups[second]

    def log(directory):
        return '\n'.join(p.read_text() for p in sorted(directory.glob('*.log')))
    assert log(sweep / 'groups' / first).count('fault injection') == 1
    half = log(sweep / 'groups' / f'{first}.1')
    assert half.count('trial group of 2 heads continuing after iteration 40 ') == 1, half[-2000:]
    assert 'fault injection' not in half and 'Iter [80/80]' in half
    assert 'fault injection' not in log(sweep / 'groups' / second)
    # the head of the first group left alone went on from its checkpoint at 40, in its own dir
    (alone,) = set(groups[first]['members']) - set(groups[f'{first}.1']['members'])
    solo = log(sweep / 'trials' / alone / 'mmseg')
    assert solo.count('resumed from') == 1 and 'Iter [60/80]' in solo, solo[-2000:]
    assert 'Iter [20/80]' not in solo and 'Iter [40/80]' not in solo
    assert json.loads((sweep / 'trials' / alone / 'placement.json').read_text())['group'] is None


def test_a_rank_stalled_past_the_collective_timeout_fails_its_trial_with_the_reason(
        tmp_path, synthetic_root, ray_address, cli_env):
    """``fault_tolerance.collective_timeout_s`` is the process group's: rank 1 stalls 60 s
    before iteration 10 (an injected fault), rank 0 waits 5 s in the next collective, and the
    trial fails saying so. Before: no such setting (torch's defaults: 30 min on gloo, 10 min on
    NCCL, less than rank 0 takes to write a 6B fine-tune's 35 GB checkpoint at 50 MB/s)."""
    base = _with_fault(tmp_path, at_iter=10, rank=1, stall_s=60)
    path = _space(tmp_path, synthetic_root, 'stall', {'model.decode_head.num_convs': {'grid': [1]}},
                  iters=60, evaluations=1, base_config=str(base),
                  fault_tolerance={'worker_retries': 0, 'collective_timeout_s': 5})
    run = subprocess.run([ORCHESTRATOR, 'sweep', str(path), '--address', ray_address],
                         env=cli_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, (run.stdout + run.stderr)[-3000:]
    reason = _failure_reason(run.stdout, run.stderr)
    assert reason.startswith('RuntimeError: ') and 'Timed out waiting 5000ms' in reason, reason


def test_a_worker_that_dies_idle_is_replaced_and_no_slot_is_stranded(
        tmp_path, synthetic_root, ray_address, ray_processes, cli_env):
    """A worker killed while idle (here: while it starts, before the first trial leases its
    crew). Before: the trial failed on its first call to the dead worker and its crew stayed
    leased, so the next trial waited forever. Now the crew is rebuilt and handed back, the
    trial restarts on it, and both trials finish."""
    path = _space(tmp_path, synthetic_root, 'idlekill',
                  {'model.decode_head.num_convs': {'grid': [0, 1]}}, iters=40, evaluations=1,
                  resources={'workers_per_trial': 2, 'cpus_per_worker': 1,
                             'max_concurrent_trials': 1})
    before = set(ray_processes('ray::TrainWorker'))
    driver = _sweep(path, ray_address, cli_env)
    try:
        _wait_for(lambda: len(set(ray_processes('ray::TrainWorker')) - before) == 2, driver)
        os.kill(max(set(ray_processes('ray::TrainWorker')) - before), signal.SIGKILL)
        killed_at = time.time()
        output = driver.communicate(timeout=300)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-3000:]
    _, _, children = _runs(tmp_path, 'idlekill')
    assert sorted(c.info.status for c in children) == ['FINISHED', 'FINISHED']
    assert sorted(c.data.metrics['restarts'] for c in children) == [0, 1]
    assert re.search(r'worker lost at iteration 0; restart 1 of 2 from iteration 0', output)
    print(f'idle worker killed -> sweep done in {time.time() - killed_at:.1f} s')


def test_a_diverging_trial_fails_as_diverged_and_the_sweep_goes_on(tmp_path, synthetic_root,
                                                                    ray_address, cli_env):
    path = _space(tmp_path, synthetic_root, 'diverge',
                  {'optimizer.lr': {'grid': [3.0e-3, 1.0e+12]}}, iters=60, evaluations=2)
    driver = _sweep(path, ray_address, cli_env)
    output = driver.communicate(timeout=300)[0]
    assert driver.returncode == 1, output[-3000:]
    assert '1 of 2 trials failed' in output and 'diverged' in output
    client, parents, children = _runs(tmp_path, 'diverge')
    by_lr = {float(c.data.params['optimizer.lr']): c for c in children}
    assert by_lr[3.0e-3].info.status == 'FINISHED'
    bad = by_lr[1.0e+12]
    assert bad.info.status == 'FAILED'
    assert bad.data.tags['failure_reason'].startswith('diverged')
    assert parents[0].info.status == 'FAILED'


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _start_mlflow_server(tmp, port, env):
    """A real `mlflow server` on 127.0.0.1 (its own process group, so stopping it stops its
    web workers too); returns once it answers /health."""
    import urllib.request
    log = open(tmp / 'mlflow_server.log', 'a')
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name('mlflow')), 'server', '--host', '127.0.0.1',
         '--port', str(port), '--workers', '1',
         '--backend-store-uri', 'sqlite:///' + str(tmp / 'server.db'),
         '--artifacts-destination', str(tmp / 'server_artifacts')],
        # no job runner: its store is a directory in /dev/shm that a stopped server leaves
        env={**env, 'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false'}, stdout=log, stderr=log,
        start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError((tmp / 'mlflow_server.log').read_text()[-3000:])


def _stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_mlflow_server_outage_loses_nothing_and_doubles_nothing(tmp_path, synthetic_root,
                                                               ray_address, cli_env):
    port = _free_port()
    uri = f'http://127.0.0.1:{port}'
    server = _start_mlflow_server(tmp_path, port, cli_env)
    path = _space(tmp_path, synthetic_root, 'outage',
                  {'model.decode_head.num_convs': {'grid': [0, 1]}}, iters=120, evaluations=3,
                  tracking={'experiment': 'outage', 'uri': uri})
    trials = tmp_path / 'out' / 'outage' / 'trials'
    driver = _sweep(path, ray_address, cli_env)
    try:
        _wait_for(lambda: any(p.read_text().count('\n') >= 1
                              for p in trials.glob('*/mmseg/metrics.jsonl')), driver)
    finally:
        _stop(server)  # the tracking server goes away mid-sweep
    down_at = time.time()
    output = driver.communicate(timeout=300)[0]
    assert driver.returncode == 3, output[-3000:]  # trials done, MLflow writes journaled
    assert 'orchestrator sync' in output

    server = _start_mlflow_server(tmp_path, port, cli_env)
    try:
        sync = subprocess.run([ORCHESTRATOR, 'sync', str(tmp_path / 'out' / 'outage')],
                              env=cli_env, capture_output=True, text=True)
        assert sync.returncode == 0 and ', 0 pending' in sync.stdout, sync.stdout + sync.stderr
        again = subprocess.run([ORCHESTRATOR, 'sync', str(tmp_path / 'out' / 'outage')],
                               env=cli_env, capture_output=True, text=True)
        assert again.returncode == 0 and '0 write(s) delivered' in again.stdout
        print(f'outage: server down -> all delivered in {time.time() - down_at:.1f} s')
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name('outage')
        runs = client.search_runs([exp.experiment_id], max_results=100)
        parents = [r for r in runs if 'mlflow.parentRunId' not in r.data.tags]
        children = [r for r in runs if 'mlflow.parentRunId' in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == 'FINISHED'
        assert len(children) == 2
        for child in children:
            assert child.info.status == 'FINISHED'
            assert child.data.tags['mlflow.parentRunId'] == parents[0].info.run_id
            assert _steps(client, child) == [40, 80, 120]
            assert _steps(client, child, 'loss') == [40, 80, 120]
            files = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {'resolved_config.py', 'fewshot_subset.txt', 'metrics.jsonl'} <= files
    finally:
        _stop(server)


def test_a_hung_mlflow_server_never_ends_a_trial_early(tmp_path, synthetic_root, ray_address,
                                                       cli_env):
    """The server hangs (SIGSTOP: every call waits for its 10 s timeout) for 4x the window after
    which a rank 0 nobody polls stops by itself (ORCHESTRATOR_ABANDONED_AFTER_S=6 here, 120 s by
    default). Before: the driver's Tune loop wrote to MLflow inline, the trials waited on it,
    their workers stopped early and were recorded FINISHED. Now every iteration trains and every
    evaluation reaches MLflow once the server answers again."""
    port = _free_port()
    uri = f'http://127.0.0.1:{port}'
    server = _start_mlflow_server(tmp_path, port, cli_env)
    path = _space(tmp_path, synthetic_root, 'hung',
                  {'model.decode_head.num_convs': {'grid': [0, 1]}}, iters=1800, evaluations=6,
                  tracking={'experiment': 'hung', 'uri': uri},
                  resources={'workers_per_trial': 1, 'cpus_per_worker': 1})
    trials = tmp_path / 'out' / 'hung' / 'trials'
    driver = _sweep(path, ray_address, dict(cli_env, ORCHESTRATOR_ABANDONED_AFTER_S='6'))
    try:
        _wait_for(lambda: any(p.read_text().count('\n') >= 1
                              for p in trials.glob('*/mmseg/metrics.jsonl')), driver)
        os.killpg(server.pid, signal.SIGSTOP)
        time.sleep(24)
        os.killpg(server.pid, signal.SIGCONT)
        output = driver.communicate(timeout=300)[0]
        assert driver.returncode in (0, 3), output[-3000:]
        if driver.returncode == 3:
            subprocess.run([ORCHESTRATOR, 'sync', str(tmp_path / 'out' / 'hung')], env=cli_env,
                           check=True, capture_output=True)
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name('hung').experiment_id])
        children = [r for r in runs if 'mlflow.parentRunId' in r.data.tags]
        assert len(children) == 2
        for child in children:
            assert child.info.status == 'FINISHED'
            assert _steps(client, child) == [300, 600, 900, 1200, 1500, 1800]
        for log in trials.glob('*/mmseg/*.log'):
            assert 'Iter [1800/1800]' in log.read_text()
            assert 'ended early' not in log.read_text()
    finally:
        if driver.poll() is None:
            driver.kill()
        os.killpg(server.pid, signal.SIGCONT)
        _stop(server)


def test_two_sweeps_at_once_share_the_default_store(tmp_path, synthetic_root, ray_address,
                                                    cli_env):
    procs, paths = [], []
    for name in ('left', 'right'):
        path = _space(tmp_path, synthetic_root, name,
                      {'model.decode_head.num_convs': {'grid': [0, 1]}}, iters=40, evaluations=2,
                      resources={'workers_per_trial': 1, 'cpus_per_worker': 1,
                                 'max_concurrent_trials': 1})
        paths.append(path)
    for path in paths:  # both at once, into tmp/out/mlflow.db
        procs.append(_sweep(path, ray_address, cli_env))
    for proc in procs:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
        assert 'locked' not in output.lower()
    for name in ('left', 'right'):
        client, parents, children = _runs(tmp_path, name)
        assert len(parents) == 1 and len(children) == 2
        for child in children:
            assert child.info.status == 'FINISHED' and _steps(client, child) == [20, 40]


def test_an_optuna_sweep_with_asha_resumes_its_search(tmp_path, synthetic_root, ray_address,
                                                       cli_env):
    """TPE (Optuna, installed with the project) under ASHA: each proposal is a child's params.
    Killed after two trials and resumed, the search goes on from its state: four distinct
    proposals, where a searcher started afresh would propose its (seeded) first two again."""
    path = _space(tmp_path, synthetic_root, 'tpe',
                  {'optimizer.lr': {'loguniform': [1e-4, 1e-2]},
                   'model.decode_head.num_convs': {'choice': [0, 1]}}, iters=40, evaluations=2,
                  search={'algorithm': 'optuna', 'num_samples': 4, 'seed': 7},
                  early_stopping={'asha': {'grace_period': 20, 'reduction_factor': 2}},
                  resources={'workers_per_trial': 1, 'cpus_per_worker': 1,
                             'max_concurrent_trials': 1})
    trials = tmp_path / 'out' / 'tpe' / 'trials'
    driver = _sweep(path, ray_address, cli_env)
    _wait_for(lambda: len(list(trials.glob('*/mmseg/*.log'))) >= 3, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    resumed = _sweep(path, ray_address, cli_env, '--resume')
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    client, parents, children = _runs(tmp_path, 'tpe')
    assert len(parents) == 1 and parents[0].info.status == 'FINISHED'
    # a trial started after Tune's last save before the kill runs again under a new id; its
    # first child says so (KILLED, tag lost_on_resume), the four trials finished
    lost = [c for c in children if 'lost_on_resume' in c.data.tags]
    assert all(c.info.status == 'KILLED' for c in lost) and len(lost) <= 1
    children = [c for c in children if c not in lost]
    assert len(children) == 4 and all(c.info.status == 'FINISHED' for c in children)
    proposals = [(float(c.data.params['optimizer.lr']), c.data.params['model.decode_head.num_convs'])
                 for c in children]
    assert len(set(proposals)) == 4, proposals
    assert all(1e-4 <= lr <= 1e-2 for lr, _ in proposals)
    for child in children:  # the proposal is what the trial trained with
        config = client.download_artifacts(child.info.run_id, 'resolved_config.py', str(tmp_path))
        assert f"lr={float(child.data.params['optimizer.lr'])!r}" in \
            Path(config).read_text().replace(' ', '')
