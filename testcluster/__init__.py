"""A faithful Kubernetes test cluster stand-in (test infrastructure; not installed, not shipped).

Pieces: ``apiserver`` (the API server stand-in: decode → prune → default → validate → store, watch,
410, finalizers, async garbage collection in ``gc``; pod admission: ServiceAccount, Priority, ResourceQuota
in ``admission``), ``events`` (the Events the controllers and the kubelet record), ``client`` (an asyncio client + informer all the
other pieces use over HTTP), ``jobcontroller`` (batch/v1 Jobs → pods), ``kubelet`` (scheduler + kubelet:
runs each pod's command in a local Python environment for its image).

Imports are lazy so that a component needing only the client does not load the server's schema code.
"""
from __future__ import annotations

from .client import ApiError, Client, Gone, Informer, api_path

__all__ = ["ApiError", "ApiServer", "Client", "Cluster", "Gone", "Informer", "api_path"]


def __getattr__(name: str):
    if name == "ApiServer":
        from .apiserver import ApiServer

        return ApiServer
    if name == "Cluster":
        from .cluster import Cluster

        return Cluster
    raise AttributeError(name)
