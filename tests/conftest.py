"""Shared fixtures. Test files never import each other (mmseg's wheel owns a top-level `tests`)."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Ray >= 2.59 starts clusters with token auth; a client must say so to send the token. Ray reads
# this once, when first imported: set it before any test imports ray.
os.environ.setdefault('RAY_AUTH_MODE', 'token')
# With token auth on, `ray start --head` refuses to run without a token, and only ray.init()
# writes one (to ~/.ray/auth_token). On a machine that has none, the session uses a token of its
# own, passed to every Ray process and driver it starts through the environment.
if not (os.environ.get('RAY_AUTH_TOKEN') or os.environ.get('RAY_AUTH_TOKEN_PATH')
        or (Path.home() / '.ray' / 'auth_token').is_file()):
    import secrets
    os.environ['RAY_AUTH_TOKEN'] = secrets.token_hex(32)
TINY_CONFIG = ROOT / 'configs' / 'tiny_fcn_synthetic.py'


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory):
    """The demo's generated dataset (4 classes, 48 train / 16 val, 64 px), once per session."""
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    return generate_ade_layout(tmp_path_factory.mktemp('data') / 'synthetic_ade')


@pytest.fixture
def tiny_cfg(synthetic_root):
    """The tiny CPU config pointed at the session's generated data."""
    from mmcv import Config
    cfg = Config.fromfile(str(TINY_CONFIG))
    for split in ('train', 'val', 'test'):
        cfg.data[split].data_root = str(synthetic_root)
    return cfg


@pytest.fixture
def small_tmpfs(tmp_path):
    """``small_tmpfs(name, size)``: a tmpfs of ``size`` (mount's syntax: '1m') at
    <tmp>/<name>, a disk the test can fill (root only; CI runs as root: elsewhere the test is
    skipped, as a full disk cannot be made safely without it). Unmounted after the test."""
    import subprocess
    mounted = []

    def mount(name, size):
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f'cannot mount a tmpfs here (needs root): {done.stderr.strip()}')
        mounted.append(path)
        return path
    yield mount
    for path in mounted:  # lazily: a process of the test that still holds a file lets go later
        subprocess.run(['umount', '--lazy', str(path)], check=True)


@pytest.fixture
def cli_env():
    """Environment for subprocesses: the venv's bin first, sane thread counts for 2 cores."""
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


@pytest.fixture(scope='session')
def ray_address(ray_head):
    return ray_head['address']


@pytest.fixture
def ray_processes(ray_head):
    """``ray_processes('ray::TrainWorker')``: pids of this session's cluster's processes."""
    return lambda prefix: _descendants(ray_head['pid'], prefix)


def _descendants(pid, prefix):
    """Processes below ``pid`` (this session's Ray head) whose command line starts with
    ``prefix``: a test touches its own cluster's processes, never others on the machine."""
    import subprocess
    table = [line.split(None, 2) for line in subprocess.run(
        ['ps', '-eo', 'pid=,ppid=,args='], capture_output=True, text=True).stdout.splitlines()]
    children = {}
    for row in table:
        if len(row) == 3:
            children.setdefault(int(row[1]), []).append((int(row[0]), row[2]))
    found, todo = [], [pid]
    while todo:
        for child, args in children.get(todo.pop(), []):
            todo.append(child)
            if args.startswith(prefix):
                found.append(child)
    return sorted(found)


@pytest.fixture(scope='session')
def ray_head(tmp_path_factory):
    """One real local Ray cluster for the whole test session, 2 CPUs, and ours alone: its own
    temp dir, its processes tied to one `ray start --head --block` process that is terminated at
    the end. Never `ray stop`: that stops every Ray cluster on the machine, a user's own too."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    ray_bin = str(Path(sys.executable).with_name('ray'))
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp('ray_head') / 'ray_start.log', 'w')
    head = subprocess.Popen(
        [ray_bin, 'start', '--head', f'--port={port}', '--num-cpus=2', '--num-gpus=0',
         '--include-dashboard=false', '--disable-usage-stats', '--block',
         f'--temp-dir={tmp_path_factory.mktemp("ray")}'], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: ours to stop, and only ours
    address = f'127.0.0.1:{port}'
    try:
        deadline = time.time() + 120
        while subprocess.run([ray_bin, 'status', f'--address={address}'],
                             capture_output=True).returncode != 0:
            assert head.poll() is None and time.time() < deadline, open(log.name).read()[-3000:]
            time.sleep(1)
        yield dict(address=address, pid=head.pid)
    finally:
        head.terminate()  # `ray start --block` stops the cluster's processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a wedged node: its process group, nothing else
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()
