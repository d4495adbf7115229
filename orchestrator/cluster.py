"""The Ray cluster a sweep runs on: its nodes and their resources (for the resource plan), and
whether the sweep's output directory is the same directory on every node.

A trial's workers may run on any node: they read the trial's few-shot list and write its
checkpoints and logs under the sweep's output directory, and the driver reads them back. On an
existing cluster that directory must therefore be on a filesystem every node mounts (NFS, a
Kubernetes volume, Slurm's shared home); this is checked before a sweep starts, not discovered
when a trial cannot find its files.
"""
import os
import os.path as osp
import socket
import uuid

from orchestrator.errors import ConfigError

STORAGE_CHECK_TIMEOUT_S = 120  # one small task per node; a fresh worker process on each
GPU_QUERY_TIMEOUT_S = 120  # one task holding a GPU: a fresh worker process importing torch
REACH_TIMEOUT_S = 10  # a head node's GCS port answering; ray.init itself retries for minutes
AUTH_HINT = ('a token-auth cluster needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or '
             'RAY_AUTH_TOKEN_PATH) here too; a cluster of another Ray version refuses this one')


def check_reachable(address):
    """A head node answers at ``address`` (host:port), or one line saying what to check, before
    ray.init retries for minutes printing Ray's C++ warnings."""
    if address in ('auto', 'local') or '://' in address:
        return
    host, _, port = address.rpartition(':')
    host = host.strip('[]')  # an IPv6 literal, [::1]:6379
    if not port.isdigit():
        raise ConfigError(f'--address {address}: expected host:port (the head node\'s GCS, as '
                          '`ray start --head` prints it)')
    try:
        socket.create_connection((host or '127.0.0.1', int(port)), REACH_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f'--address {address}: no Ray head node answers there '
                          f'({e.strerror or type(e).__name__}); start one with `ray start --head '
                          f'--port {port}` on that host, or give its address') from None


def refused(address, error):
    """The one line for a head node that answered but refused this driver."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return ConfigError(f'--address {address}: Ray refused the connection ({first}); {AUTH_HINT}')


def local_nodes():
    """This machine as the one node of the local cluster ``ray.init`` would start."""
    import torch
    return [dict(name='this machine', resources={'CPU': float(os.cpu_count() or 1),
                                                 'GPU': float(torch.cuda.device_count())})]


def cluster_nodes():
    """The alive nodes of the connected Ray cluster: name (IP and short ID), ID, resources."""
    import ray
    return [dict(name=f'{n["NodeManagerAddress"]} ({n["NodeID"][:8]})', node_id=n['NodeID'],
                 resources=dict(n['Resources']))
            for n in ray.nodes() if n['Alive']]


def local_gpu_memory():
    """Total memory of this machine's first GPU in bytes, or None (no GPU here)."""
    import torch
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def gpu_memory():
    """Total memory of a GPU of the connected cluster in bytes (one task holding one GPU, so
    where the workers will train), or None when no GPU answers: the group size then falls
    back to grouping.py's default."""
    import ray
    try:
        return ray.get(ray.remote(num_cpus=0, num_gpus=1)(local_gpu_memory).remote(),
                       timeout=GPU_QUERY_TIMEOUT_S)
    except Exception:  # no free GPU in time, or a worker that cannot start
        return None


def _reads(path, token):
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def _answer(ref):
    """What one node's read returned, or None for a node that left the cluster since ray.nodes()
    listed it (its death not yet noticed there): it runs nothing of this sweep."""
    import ray
    try:
        return ray.get(ref)
    except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError,
            ray.exceptions.WorkerCrashedError):
        return None


def check_shared_storage(directory, nodes, source):
    """The nodes of ``nodes`` still in the cluster; ConfigError unless each sees the file the
    driver writes in ``directory``."""
    present, blind = storage_check(directory, nodes)
    if blind:
        raise blind_storage(directory, blind, source)
    return present


def blind_storage(directory, blind, source):
    """The error for nodes that do not see ``directory`` as the driver does."""
    return ConfigError(
        f'{source}: output: {directory} is not the same directory on node(s) '
        f'{", ".join(n["name"] for n in blind)}: a sweep on a cluster needs its output on a '
        'filesystem every node mounts (NFS, a shared volume); pass --output with such a path')


def storage_check(directory, nodes):
    """(the nodes still in the cluster that see the file the driver writes in ``directory``,
    those that do not)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    os.makedirs(directory, exist_ok=True)
    token = uuid.uuid4().hex
    marker = osp.join(directory, f'.storage-check-{token[:12]}')
    with open(marker, 'w') as f:
        f.write(token)
    try:
        reads = ray.remote(num_cpus=0)(_reads)
        refs = [reads.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n['node_id'], soft=False)).remote(marker, token) for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STORAGE_CHECK_TIMEOUT_S)
        answers = [_answer(ref) if ref in ready else False for ref in refs]
    finally:
        os.remove(marker)
    return ([n for n, seen in zip(nodes, answers) if seen],
            [n for n, seen in zip(nodes, answers) if seen is False])
