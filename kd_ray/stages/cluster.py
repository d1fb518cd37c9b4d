"""Joining or starting a Ray cluster, and the checks that belong to the cluster as a whole."""
from __future__ import annotations

import os

import ray

from kd_ray.core import storage
from kd_ray.core.config import ExperimentConfig


def init_ray(cfg: ExperimentConfig) -> None:
    """Join ``runtime.address`` (or RAY_ADDRESS); with neither, start a local cluster.

    The dashboard stays on (Train's internal actors use the state API), bound to 127.0.0.1.
    """
    if not ray.is_initialized():
        address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            # Train's controller takes each report off a 1-slot queue once per health check:
            # the default interval would cost seconds per reported epoch on small data
            os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
            ray.init(num_cpus=cfg.runtime.num_cpus, num_gpus=cfg.runtime.num_gpus,
                     include_dashboard=True, dashboard_host="127.0.0.1")
    check_storage(cfg)


def largest_node(resource: str) -> tuple[float, str]:
    """How much of ``resource`` ("CPU", "GPU") the biggest alive node has, and a name for it.

    A request above this can never be scheduled, so callers fail at once instead of hanging.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        raise RuntimeError("no alive Ray nodes")
    biggest = max(nodes, key=lambda n: n["Resources"].get(resource, 0))
    return biggest["Resources"].get(resource, 0), f"{biggest['NodeManagerAddress']}, node {biggest['NodeID'][:8]}"


def check_storage(cfg: ExperimentConfig) -> None:
    """On more than one node, checkpoints and caches must live on shared storage."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    path = cfg.runtime.storage_path
    if len(nodes) > 1 and storage.is_local(path) and not cfg.runtime.shared_filesystem:
        raise ValueError(
            f"runtime.storage_path={path!r} is a local path, but the cluster has {len(nodes)} nodes: "
            f"each node would write its own copy and teachers, caches and checkpoints would not be "
            f"found by the others. Set runtime.storage_path to an s3:// or gs:// URI (or, if {path!r} "
            f"is a shared mount such as NFS on every node, set runtime.shared_filesystem: true)."
        )
