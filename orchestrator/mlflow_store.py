"""The MLflow store a sweep writes to: its default URI, the sweep's experiment (created, or
refused at once), and URIs that never carry secrets past the command line.

``http://user:password@host/`` is MLflow's way to pass basic-auth credentials, but a URI is
printed (progress, errors), saved (``tracking.json``) and written into reports that are uploaded
to MLflow. The credentials are moved to MLflow's own variables, ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` (read by its REST client at every request, never written anywhere
by us), and the URI is kept without them. Later commands (``sync``, ``report``, ``best``) need
those variables set, as any MLflow client does.
"""
import os
import os.path as osp
from urllib.parse import urlsplit, urlunsplit

from orchestrator.errors import ConfigError


def without_credentials(uri):
    """``uri`` without ``user:password@``; the credentials go to MLflow's environment."""
    if not uri or '@' not in uri:
        return uri
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    if parts.username:
        os.environ['MLFLOW_TRACKING_USERNAME'] = parts.username
    if parts.password:
        os.environ['MLFLOW_TRACKING_PASSWORD'] = parts.password
    host = parts.netloc.rsplit('@', 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def default_tracking_uri(output_root):
    """An absolute sqlite URI: Ray changes each trial's working directory, so relative URIs
    break, and MLflow 3 refuses plain file stores by default."""
    return 'sqlite:///' + osp.join(osp.abspath(output_root), 'mlflow.db')


class ExperimentRefused(ConfigError):
    """The store holds the sweep's experiment name in a state no write can use (deleted)."""


def get_or_create_experiment(client, name, artifact_root):
    """With a local store, artifacts go to an absolute folder beside it (MLflow's default is
    ./mlruns relative to the working directory); an http:// server chooses its own. A deleted
    experiment of that name would refuse every run: that is an ExperimentRefused, at once."""
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == 'deleted':
        raise ExperimentRefused(
            f'tracking.experiment: {name!r}: deleted in the MLflow store {client.tracking_uri} '
            f'(id {exp.experiment_id}); restore it (mlflow experiments restore '
            f'--experiment-id {exp.experiment_id}), remove it for good (mlflow gc), or choose '
            'another experiment name')
    if exp is not None:
        return exp.experiment_id
    local = not client.tracking_uri.startswith(('http://', 'https://'))
    location = 'file://' + osp.abspath(artifact_root) if local else None
    return client.create_experiment(name, artifact_location=location)
