"""Ray start-up, one policy for every command (train, tune, data convert/verify, evaluate, predict):
join the cluster there is, else start a local Ray on this machine sized for the job.

    connect()                        # RAY_ADDRESS / `ray job submit` / `ray start`, else a local Ray
    connect(cpus=6)                  # a local Ray gets at least 6 logical CPUs (the OS shares the cores)
    require_spare_cpu(reserved=4)    # ClusterError unless Ray Data keeps a CPU besides the reserved 4
    n, resources = pool_size(None)   # inference actors over the cluster: one per GPU, else per 2 CPUs
"""

from __future__ import annotations

import logging
import os
import socket

import ray


class ClusterError(ValueError):
    """A Ray cluster that cannot run the job as asked; the message says what to change."""


def connect(cpus: float = 0, *, quiet: bool = False) -> None:
    """Join the running cluster (`ray job submit`, RAY_ADDRESS, `ray start` on this machine), else
    start a local Ray with max(cores, `cpus`) logical CPUs. A cluster that `ray start` recorded
    here but that no longer answers (stopped without `ray stop`) is passed over, with a message."""
    if ray.is_initialized():
        return
    # quiet: Ray's own info lines (start-up, dashboard address) off, and Ray Data's in this job's workers
    # ("Dataset ... execution finished" from every epoch's coordinator); their warnings stay
    level = {"logging_level": logging.WARNING if quiet else logging.INFO}
    if quiet and "RAY_DATA_LOG_LEVEL" not in os.environ:  # merged per variable with a submitted job's own
        level["runtime_env"] = {"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}}
    local = {"num_cpus": max(os.cpu_count() or 1, int(-(-cpus // 1))), **level}
    recorded = recorded_cluster()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**level)
    elif recorded and not _answers(recorded):
        print(f"[densenet_ray] the Ray cluster recorded at {recorded} does not answer (stopped without "
              f"`ray stop`?); starting a local Ray instead", flush=True)
        ray.init(address="local", **local)
    else:
        try:  # starts a local Ray, unless `ray start` left a cluster on this machine to join
            ray.init(**local)
        except ValueError as err:  # "When connecting to an existing cluster, num_cpus ... must not be provided"
            if "existing cluster" not in str(err):
                raise
            ray.init(**level)


def recorded_cluster_file() -> str:
    """Where `ray start --head` records its GCS address for later `ray.init()` calls on this machine."""
    return os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")


def recorded_cluster() -> str | None:
    """The GCS address `ray start --head` left on this machine for `ray.init()` to join, if any."""
    try:
        with open(recorded_cluster_file()) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def cluster_cpus() -> float:
    """The CPUs the cluster has, or the most an autoscaling cluster can grow to (it may start smaller)."""
    try:  # Ray Train sizes against the same figure; a private API, so only a hint
        from ray._private.state import state

        most = (state.get_max_resources_from_cluster_config() or {}).get("CPU", 0)
    except (ImportError, AttributeError):
        most = 0
    return max(ray.cluster_resources().get("CPU", 0), most)


def require_spare_cpu(reserved: float, *, who: str, change: str) -> None:
    """Ray Data's read and decode tasks need a CPU of their own or the input pipeline waits forever:
    refuse, before anything hangs, a job whose actors (`who`) reserve every CPU."""
    total = cluster_cpus()
    if total - reserved < 1:
        raise ClusterError(f"the Ray cluster has {total:g} CPUs and {who} reserve {reserved:g}; Ray Data needs at "
                           f"least one more CPU to read and decode images: {change}, or add CPU nodes")


def cpu_nodes() -> list[dict]:
    """The live nodes with CPUs (ray.nodes() entries)."""
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def pool_size(actors: int | None) -> tuple[int, dict]:
    """(actors, Ray resources of each) for an inference actor pool over the cluster: one actor per
    GPU when there are GPUs, else one per two CPUs, leaving CPUs for the tasks that read and decode."""
    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), total.get("CPU", 0)
    if gpus:
        return min(actors or gpus, gpus), {"num_gpus": 1}
    n = actors or max(1, int(cpus // 2))
    if cpus - n < 1:
        raise ClusterError(f"--actors {n}: the Ray cluster has {cpus:g} CPUs and each inference actor reserves one; "
                           f"reading and decoding need at least one more: use --actors {max(1, int(cpus) - 1)} or "
                           "fewer")
    return n, {"num_cpus": 1}
