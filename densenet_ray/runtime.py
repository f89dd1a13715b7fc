"""Ray start-up, one policy for every command (train, tune, data convert/verify, evaluate, predict):
join the cluster there is, else start a local Ray on this machine sized for the job.

    connect()                        # RAY_ADDRESS / `ray job submit` / `ray start`, else a local Ray
    connect(cpus=6)                  # a local Ray gets at least 6 logical CPUs (the OS shares the cores)
    forwarded_env()                  # the S3 settings (AWS_ENDPOINT_URL, ...) this job's workers are given
    require_spare_cpu(reserved=4)    # ClusterError unless Ray Data keeps a CPU besides the reserved 4
    require_placement(workers=4, cpus=1, gpus=1, strategy="STRICT_SPREAD")   # ClusterError unless it can be placed
    n, resources = pool_size(None)   # inference actors over the cluster: one per GPU, else per 2 CPUs
"""

from __future__ import annotations

import json
import logging
import os
import socket

import ray


class ClusterError(ValueError):
    """A Ray cluster that cannot run the job as asked; the message says what to change."""


# What the S3 clients in the workers read from their environment (pyarrow's S3FileSystem for data and
# checkpoints, boto3 when MLflow writes to S3 itself): an S3-compatible endpoint (MinIO, Ceph) and its
# credentials. Workers of a cluster this process joins were started with the nodes' environment, not
# this one's: connect() gives them these, as set here.
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_EC2_METADATA_DISABLED", "MLFLOW_S3_ENDPOINT_URL")
# Ours, read in the workers: the per-step row log (position.py) and the SIGTERM grace (preempt.py).
OWN_SETTINGS = ("DENSENET_RAY_ROWS_LOG", "DENSENET_RAY_SIGTERM_GRACE_S")


SETUP_HOOK = "densenet_ray.preempt.install"   # runs in every worker process of the job (runtime_env)


def connect(cpus: float = 0, *, quiet: bool = False) -> None:
    """Join the running cluster (`ray job submit`, RAY_ADDRESS, `ray start` on this machine), else
    start a local Ray with max(cores, `cpus`) logical CPUs. A cluster that `ray start` recorded
    here but that no longer answers (stopped without `ray stop`) is passed over, with a message."""
    if ray.is_initialized():
        return
    # quiet: Ray's own info lines (start-up, dashboard address) off, and Ray Data's in this job's workers
    # ("Dataset ... execution finished" from every epoch's coordinator); their warnings stay
    level = {"logging_level": logging.WARNING if quiet else logging.INFO}
    env_vars = forwarded_env()
    if quiet and "RAY_DATA_LOG_LEVEL" not in os.environ:  # merged per variable with a submitted job's own
        env_vars["RAY_DATA_LOG_LEVEL"] = "WARNING"
    # Every worker process of the job: SIGTERM to a training worker checkpoints before it exits (preempt.py).
    level["runtime_env"] = {"worker_process_setup_hook": SETUP_HOOK,
                            **({"env_vars": env_vars} if env_vars else {})}
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


def forwarded_env() -> dict:
    """The S3_SETTINGS and OWN_SETTINGS set in this process's environment, for the job's runtime env: every task and
    worker of the job gets them. Those a submitted job's own runtime env already sets (`ray job submit
    --runtime-env-json`) are left to it: Ray refuses a variable given twice, and gives them anyway."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    try:
        submitted = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}").get("runtime_env") or {}
    except ValueError:
        submitted = {}
    given = submitted.get("env_vars") or {}
    return {name: os.environ[name] for name in S3_SETTINGS + OWN_SETTINGS if name in os.environ and name not in given}


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


def autoscaler_limit() -> dict | None:
    """The most resources an autoscaling cluster can grow to ({"CPU": ..., "GPU": ...}), or None when
    no autoscaler could add nodes (a local Ray, a fixed `ray start` cluster)."""
    try:  # Ray Train sizes against the same figure; a private API (tests/test_private_apis.py)
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or None
    except (ImportError, AttributeError):
        return None


def cluster_cpus() -> float:
    """The CPUs the cluster has, or the most an autoscaling cluster can grow to (it may start smaller)."""
    return max(ray.cluster_resources().get("CPU", 0), (autoscaler_limit() or {}).get("CPU", 0))


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


def describe_cluster(nodes: list[dict]) -> str:
    """'2 nodes, 8 CPUs, no GPUs': what a person needs to see to change a request."""
    cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    return (f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, {cpus:g} CPUs, "
            + (f"{gpus:g} GPUs" if gpus else "no GPUs"))


def require_placement(*, workers: int, cpus: float, gpus: float, strategy: str) -> None:
    """Refuse what Ray would wait for forever: `workers` actors of `cpus` CPUs and `gpus` GPUs each,
    placed by `strategy`, on the live nodes. An autoscaling cluster may add nodes: there, only GPUs
    it can never have are refused."""
    limit = autoscaler_limit()
    if limit is not None:
        if gpus > 0 and not limit.get("GPU", 0):
            raise ClusterError(f"--gpus-per-worker {gpus:g}: the Ray cluster has no GPUs and its autoscaler "
                               "cannot add any: use --gpus-per-worker 0 (CPU training), or add GPU node types")
        return
    nodes = cpu_nodes()
    has = f"the Ray cluster has {describe_cluster(nodes)}, and no autoscaler to add more"
    total_gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    if gpus > 0 and total_gpus == 0:
        raise ClusterError(f"--gpus-per-worker {gpus:g}: {has}: train on CPUs with --gpus-per-worker 0, or join "
                           "a cluster with GPUs (RAY_ADDRESS, ray job submit)")
    if gpus * workers > total_gpus:
        raise ClusterError(f"--workers {workers} --gpus-per-worker {gpus:g} need {gpus * workers:g} GPUs; {has}: "
                           f"use fewer --workers or less --gpus-per-worker")
    fits = [n for n in nodes if n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus]
    if not fits:
        raise ClusterError(f"--cpus-per-worker {cpus:g} --gpus-per-worker {gpus:g}: no node can hold one worker; "
                           f"{has} (the largest: {max(n['Resources'].get('CPU', 0) for n in nodes):g} CPUs): "
                           "ask for less per worker")
    if strategy == "STRICT_SPREAD" and workers > len(fits):
        raise ClusterError(f"--placement-strategy STRICT_SPREAD puts each of --workers {workers} on a node of its "
                           f"own; {has}, {len(fits)} of them large enough for a worker: use --workers {len(fits)} "
                           "or fewer, or --placement-strategy SPREAD")
    if strategy == "STRICT_PACK" and not any(n["Resources"].get("CPU", 0) >= cpus * workers
                                             and n["Resources"].get("GPU", 0) >= gpus * workers for n in nodes):
        raise ClusterError(f"--placement-strategy STRICT_PACK puts all --workers {workers} on one node, "
                           f"{cpus * workers:g} CPUs{f' and {gpus * workers:g} GPUs' if gpus else ''}; {has}, none "
                           "that large: use fewer --workers, or --placement-strategy PACK")


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
