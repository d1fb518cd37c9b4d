"""Joining or starting a Ray cluster, and what the cluster can hold: now, and once the autoscaler
has added every node its configuration allows.

An autoscaling cluster's GPU worker types usually start at 0 nodes, so the nodes alive now are
the wrong feasibility test. :func:`capacity` reads the node types the autoscaler may launch
(the cluster config it reports to the GCS; a fixed cluster has none and is its alive nodes). A
request no node type could ever hold fails at once, naming the field; a feasible one asks the
autoscaler for it and waits, printing what it waits for, until ``runtime.scale_timeout_s``.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import ray
import ray.data

from kd_ray.core import storage
from kd_ray.core.config import ExperimentConfig
from kd_ray.stages.tracking import save_config

UNBOUNDED = 1_000_000  # a node type with no max_count


@dataclass(frozen=True)
class NodeKind:
    """An alive node (count 1) or a node type the autoscaler may launch (up to ``max_count``)."""

    name: str
    resources: dict = field(hash=False)
    max_count: int = 1

    def holds(self, need: dict[str, float]) -> bool:
        return all(self.resources.get(r, 0) + 1e-9 >= v for r, v in need.items() if v > 0)


@dataclass
class Capacity:
    alive: list[NodeKind]
    launchable: list[NodeKind]  # the autoscaler's node types; empty on a fixed cluster

    @property
    def autoscaling(self) -> bool:
        return bool(self.launchable)

    def fits_now(self, need: dict[str, float]) -> bool:
        return any(n.holds(need) for n in self.alive)

    def could_fit(self, need: dict[str, float]) -> bool:
        return any(n.holds(need) for n in self.alive + self.launchable)

    def largest(self, resource: str) -> tuple[float, str]:
        """The most of ``resource`` any node has or could have, and that node's (type's) name."""
        best = max(self.alive + self.launchable, key=lambda n: n.resources.get(resource, 0))
        return best.resources.get(resource, 0), best.name

    def max_nodes(self) -> int:
        """How many nodes the cluster has, or may grow to."""
        return max(len(self.alive), sum(min(n.max_count, UNBOUNDED) for n in self.launchable))

    def max_resources(self) -> dict[str, float]:
        """The cluster's totals at its largest: what every node type at its max count holds."""
        now: dict[str, float] = {}
        for n in self.alive:
            for r, v in n.resources.items():
                now[r] = now.get(r, 0) + v
        most: dict[str, float] = {}
        for n in self.launchable:
            for r, v in n.resources.items():
                most[r] = most.get(r, 0) + v * min(n.max_count, UNBOUNDED)
        return {r: max(now.get(r, 0), most.get(r, 0)) for r in set(now) | set(most)}

    def has_gpus(self) -> bool:
        return self.largest("GPU")[0] > 0


def capacity() -> Capacity:
    """The alive nodes and the node types the autoscaler may launch."""
    alive = [NodeKind(f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]})",
                      {r: float(v) for r, v in n["Resources"].items() if "node:" not in r and "group" not in r})
             for n in ray.nodes() if n.get("Alive")]
    return Capacity(alive, _node_types_from_gcs() or _node_types_from_monitor())


def _node_types_from_gcs() -> list[NodeKind]:
    """Autoscaler v2 (`ray up`'s default) reports its node groups to the GCS."""
    from ray._private.state import state  # no public API for the node types in Ray 2.60

    config = state.get_cluster_config()
    kinds = []
    for g in (config.node_group_configs if config else []):
        count = UNBOUNDED if g.max_count == -1 else int(g.max_count)
        if count != 0:
            kinds.append(NodeKind(f"node type {g.name!r}", {r: float(v) for r, v in g.resources.items()}, count))
    return kinds


def _node_types_from_monitor() -> list[NodeKind]:
    """Autoscaler v1 does not: read the config file its monitor process on this node was given
    (`--autoscaling-config=`; jobs' drivers run on the head, where the monitor runs)."""
    import psutil  # a Ray dependency
    import yaml

    try:  # processes come and go while we look
        commands = [p.info.get("cmdline") or [] for p in psutil.process_iter(["cmdline"])]
    except (psutil.Error, OSError):
        commands = []
    for args in commands:
        path = next((a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")), None)
        if not (path and any("monitor.py" in a for a in args)):
            continue
        try:
            with open(os.path.expanduser(path)) as f:
                config = yaml.safe_load(f) or {}
        except OSError:
            continue
        head, default_max = config.get("head_node_type"), config.get("max_workers", 0)
        return [NodeKind(f"node type {name!r}", {r: float(v) for r, v in (t.get("resources") or {}).items()},
                         1 if name == head else int(t.get("max_workers", default_max)))
                for name, t in (config.get("available_node_types") or {}).items()
                if name == head or t.get("max_workers", default_max)]
    return []


def check_feasible(cap: Capacity, need: dict[str, float], fields: dict[str, str], what: str) -> None:
    """Fail at once when no node, alive or launchable, could ever hold ``need``; ``fields`` names
    the config field of each resource."""
    if cap.could_fit(need):
        return
    short = next((r for r, v in need.items() if v > cap.largest(r)[0] + 1e-9), "CPU")
    have, name = cap.largest(short)
    raise ValueError(f"{what} asks for {need[short]:g} {short}s ({fields[short]}) but the largest node"
                     f"{' or node type' if cap.autoscaling else ''} ({name}) has {have:g}; lower {fields[short]} "
                     f"or add a node type with more {short}s")


def wait_for(needs: list[dict[str, float]], fields: dict[str, str], what: str, timeout_s: float,
             poll_s: float = 2.0, names: list[str] | None = None) -> Capacity:
    """Fail at once when no node type could hold a need (``names`` names each in the error, else
    ``what``); otherwise wait until the cluster can hold the largest of ``needs`` (asking the
    autoscaler for all of them), printing what it waits for; fail after ``timeout_s`` naming the
    resource and the field."""
    cap = capacity()
    for need, name in zip(needs, names or [what] * len(needs)):
        check_feasible(cap, need, fields, name)
    needs = sorted(needs, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), reverse=True)
    if cap.fits_now(needs[0]):
        return cap
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{r: v for r, v in n.items() if v > 0} for n in needs])
    start = time.time()
    resource = "GPU" if needs[0].get("GPU", 0) > 0 else "CPU"
    try:
        while not cap.fits_now(needs[0]):
            waited = time.time() - start
            if waited > timeout_s:
                raise TimeoutError(
                    f"{what}: no node with {needs[0].get(resource, 0):g} {resource} ({fields[resource]}) joined within "
                    f"runtime.scale_timeout_s={timeout_s:g} s; check the autoscaler (`ray status`) or raise "
                    f"runtime.scale_timeout_s")
            up = sum(1 for n in cap.alive if n.resources.get(resource, 0) > 0)
            print(f"[kd_ray] waiting for the autoscaler: {len(needs)} {what} need {needs[0].get(resource, 0):g} "
                  f"{resource} each, {up} {resource} nodes up, {waited:.0f} s", file=sys.stderr, flush=True)
            time.sleep(min(poll_s, max(0.05, timeout_s - waited)))  # the deadline is kept to the poll
            cap = capacity()
    finally:
        request_resources(bundles=[])  # the stage's own demand keeps the nodes from here on
    return cap


def _live_local_cluster() -> str | None:
    """The GCS address of a Ray cluster running on this machine (live processes, not just the
    session files a killed cluster leaves behind), or None."""
    from ray._private import services  # Ray's own discovery; no public API in Ray 2.60

    live = services.find_gcs_addresses()
    if not live:
        return None
    latest = services.find_bootstrap_address(None)
    return latest if latest in live else sorted(live)[0]


def init_ray(cfg: ExperimentConfig) -> None:
    """Join ``runtime.address`` (or RAY_ADDRESS), else a cluster running on this machine; start a
    local one only when none is running (``runtime.num_cpus`` / ``num_gpus`` size only that one).

    The dashboard stays on (Train's internal actors use the state API), bound to 127.0.0.1.
    """
    env = cfg.runtime.storage_options.env()
    os.environ.update(env)  # runtime.storage_options, for this process and (below) every Ray worker
    storage.check_writable(cfg.runtime.storage_path)  # before any Ray work
    if not ray.is_initialized():
        address = cfg.runtime.address or os.environ.get("RAY_ADDRESS") or _live_local_cluster()
        quiet = {"log_to_driver": cfg.runtime.verbose}  # worker output stays in Ray's log files
        if env:
            quiet["runtime_env"] = {"env_vars": env}
        if not cfg.runtime.verbose:
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with Tune's verbose=0: no trial tables
        if address:
            ray.init(address=address, **quiet)
            print(f"[kd_ray] joined the Ray cluster at {address}", file=sys.stderr, flush=True)
        else:
            # Train's controller takes each report off a 1-slot queue once per health check:
            # the default interval would cost seconds per reported epoch on small data
            os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
            ray.init(address="local", num_cpus=cfg.runtime.num_cpus, num_gpus=cfg.runtime.num_gpus,
                     include_dashboard=True, dashboard_host="127.0.0.1", **quiet)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.runtime.verbose
    if not cfg.runtime.verbose:  # Ray Data's and Tune's INFO lines and hints: their log files only
        for name in ("ray.data", "ray.tune", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)
    check_storage(cfg)
    save_config(cfg)  # <storage>/<name>/config.yaml: what this run was asked to do


def check_storage(cfg: ExperimentConfig, cap: Capacity | None = None) -> None:
    """On a cluster that has or may get more than one node, checkpoints and caches must live on
    shared storage."""
    cap = cap or capacity()
    path, nodes = cfg.runtime.storage_path, cap.max_nodes()
    if nodes > 1 and storage.is_local(path) and not cfg.runtime.shared_filesystem:
        grows = "may grow to" if cap.autoscaling and nodes > len(cap.alive) else "has"
        raise ValueError(
            f"runtime.storage_path={path!r} is a local path, but the cluster {grows} "
            f"{nodes if nodes < UNBOUNDED else 'many'} nodes: "
            f"each node would write its own copy and teachers, caches and checkpoints would not be "
            f"found by the others. Set runtime.storage_path to an s3:// or gs:// URI (or, if {path!r} "
            f"is a shared mount such as NFS on every node, set runtime.shared_filesystem: true)."
        )


def student_uses_gpu(cfg: ExperimentConfig, cap: Capacity | None = None) -> bool:
    """GPU Train workers: ``student.use_gpu`` when set, else whenever the cluster has or may get a
    GPU node (never the driver's CUDA: the head is often CPU-only)."""
    if cfg.student.use_gpu is not None:
        return cfg.student.use_gpu
    return (cap or capacity()).has_gpus()
