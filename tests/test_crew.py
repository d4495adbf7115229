"""Crews (a trial slot's warm workers) on a real local Ray cluster: a reused crew trains a second
trial exactly as a fresh one would, a stop request ends all ranks early, a failed crew is
rebuilt."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL_IMAGES = {'fewshot.fraction': 1.0, 'fewshot.seed': 0}  # a job's derived subset values


@pytest.fixture(scope='module')
def pool(ray_address):
    import ray

    from orchestrator.crew import WorkerPool
    ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    pool = WorkerPool.remote(1, 2, {'CPU': 1.0})
    yield pool
    ray.kill(pool)
    ray.shutdown()


def _job(tiny_cfg, out, trial_id, **overrides):
    from orchestrator.sweep_plan import PlannedTrial
    from orchestrator.train_worker import TrialJob
    from orchestrator.plan import plain
    out.mkdir(parents=True, exist_ok=True)
    overrides = {'runner.max_iters': 40, 'evaluation.interval': 20,
                 'checkpoint_config.interval': 20, **overrides}
    return TrialJob(base=plain(tiny_cfg), trial=PlannedTrial(0, {}, {}, overrides, ALL_IMAGES),
                    base_filename=tiny_cfg.filename,
                    trial_dir=str(out), source='test', trial_id=trial_id)


def _run(pool, job):
    import ray
    cid, workers = ray.get(pool.acquire.remote(job.trial_id))
    address = ray.get(workers[0].rendezvous.remote(len(workers)))
    runs = [w.run.remote(job, rank, len(workers), address) for rank, w in enumerate(workers)]
    pool.release_when_done.remote(cid, runs)
    return workers, runs


def _eventually(predicate, timeout=60):
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline:
        time.sleep(0.5)
    return predicate()


def test_warm_crew_reproduces_a_trial_exactly(pool, tiny_cfg, tmp_path):
    import ray
    pids = []
    results = []
    for i in range(2):
        job = _job(tiny_cfg, tmp_path / f't{i}', f't{i}')
        workers, runs = _run(pool, job)
        results.append([{k: v for k, v in r.items()  # all but the wall-clock measurements
                         if k != 'eval_time' and not k.startswith('cost.')}
                        for r in ray.get(runs)])
        pids.append([ray.get(w.where.remote())['pid'] for w in workers])
        reports = ray.get(workers[0].drain.remote(f't{i}'))
        assert [r['iter'] for r in reports] == [20, 40]
    assert pids[0] == pids[1]  # the same two processes trained both trials
    assert results[0] == results[1] and results[0][0] == results[0][1]  # ranks agree
    digests = [json.loads((tmp_path / f't{i}' / 'mmseg' / 'rank_sync.json').read_text())
               for i in range(2)]
    assert digests[0] == digests[1] and len(set(digests[0]['decode_head_sha256'])) == 1
    # Each trial has its own log file (mmcv caches its logger per process).
    for i in range(2):
        logs = list((tmp_path / f't{i}' / 'mmseg').glob('*.log'))
        assert logs and 'Iter [40/40]' in logs[0].read_text()
    assert (tmp_path / 't0' / 'resolved_config.py').is_file()


def test_stop_request_ends_every_rank_early(pool, tiny_cfg, tmp_path):
    import ray
    job = _job(tiny_cfg, tmp_path, 'long', **{'runner.max_iters': 4000,
                                              'evaluation.interval': 10})
    workers, runs = _run(pool, job)
    reports = []
    assert _eventually(lambda: reports.extend(ray.get(workers[0].drain.remote('long'))) or reports,
                       timeout=120)
    ray.get([w.request_stop.remote('long') for w in workers[:1]])  # rank 0 asks; all stop
    final = ray.get(runs, timeout=60)
    assert final[0] == final[1] and 10 <= final[0]['iter'] < 4000
    assert not (tmp_path / 'mmseg' / 'rank_sync.json').exists()  # ended before the end
    assert _eventually(lambda: ray.get(pool.stats.remote())['free'] == 1)  # crew released


def test_a_killed_worker_fails_the_run_and_the_crew_is_rebuilt(pool, tiny_cfg, tmp_path):
    import ray
    job = _job(tiny_cfg, tmp_path / 'k', 'killed', **{'runner.max_iters': 4000})
    workers, runs = _run(pool, job)
    victim = ray.get(workers[1].where.remote())['pid']
    time.sleep(3)
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayError) as failed:
        ray.get(runs, timeout=120)
    assert not isinstance(failed.value, ray.exceptions.GetTimeoutError)  # it failed, not hung
    assert _eventually(lambda: ray.get(pool.stats.remote())['rebuilt'] == 1)
    job = _job(tiny_cfg, tmp_path / 'after', 'after', **{'runner.max_iters': 20,
                                                          'evaluation.interval': 20})
    workers, runs = _run(pool, job)
    assert victim not in [ray.get(w.where.remote())['pid'] for w in workers]
    assert ray.get(runs, timeout=120)[0]['iter'] == 20


def _listening(port):
    """Local addresses (hex, as /proc/net/tcp writes them) listening on ``port``."""
    rows = [line.split() for line in open('/proc/net/tcp').read().splitlines()[1:]]
    return {r[1].split(':')[0] for r in rows if r[3] == '0A' and int(r[1].split(':')[1], 16) == port}


def test_the_rendezvous_listens_on_the_nodes_ip_only(pool):
    """A trial's rendezvous is reachable where Ray runs, not on every interface of the host."""
    import ipaddress

    import ray
    cid, workers = ray.get(pool.acquire.remote('rendezvous'))
    try:
        address = ray.get(workers[0].rendezvous.remote(2))
        host, port = address.rsplit(':', 1)
        ip = ipaddress.ip_address(host)
        assert _listening(int(port)) == {ip.packed[::-1].hex().upper()}  # not 00000000
    finally:
        ray.get(pool.release_broken.remote(cid, 'test'))



@pytest.fixture
def gpu_node(pool, ray_address):
    """A node with 2 logical GPUs joins the session's cluster for one test (Ray hands out GPU
    ids without any GPU: what a worker sees and picks is Ray's and ours, not CUDA's)."""
    import subprocess
    import sys

    import ray
    node = subprocess.Popen([str(Path(sys.executable).with_name('ray')), 'start',
                             f'--address={ray_address}', '--num-cpus=2', '--num-gpus=2',
                             '--block', '--disable-usage-stats'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        assert _eventually(lambda: any(n['Alive'] and n['Resources'].get('GPU') == 2
                                       for n in ray.nodes()))
        yield
    finally:
        node.terminate()
        node.wait(timeout=60)


def test_a_trials_workers_see_their_nodes_gpus_and_pick_their_own(gpu_node):
    """As Ray Train: the ranks of a trial on one node see the node's GPUs (so NCCL can use
    NVLink between them) and each trains on its own, by its node-local index."""
    import ray

    from orchestrator.crew import WorkerPool
    gpu_pool = WorkerPool.remote(1, 2, {'CPU': 1.0, 'GPU': 1.0})
    try:
        _, workers = ray.get(gpu_pool.acquire.remote('gpus'), timeout=120)
        ranks = ray.get([w.where.remote() for w in workers], timeout=120)
        assert len({r['node_id'] for r in ranks}) == 1  # packed on the 2-GPU node
        assert sorted(r['gpu_ids'] for r in ranks) == [['0'], ['1']]
        for r in ranks:
            assert r['visible'] is None  # Ray did not narrow CUDA_VISIBLE_DEVICES to one GPU
        # each trains on its own of the node's two devices (the torch index each will use)
        assert sorted(r['device'] for r in ranks) == [0, 1]
    finally:
        ray.kill(gpu_pool)
