"""Tracking URIs never carry secrets past the command line.

``http://user:password@host/`` is MLflow's way to pass basic-auth credentials, but a URI is
printed (progress, errors), saved (``tracking.json``) and written into reports that are uploaded
to MLflow. The credentials are moved to MLflow's own variables, ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` (read by its REST client at every request, never written anywhere
by us), and the URI is kept without them. Later commands (``sync``, ``report``, ``best``) need
those variables set, as any MLflow client does.
"""
import os
from urllib.parse import urlsplit, urlunsplit


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
