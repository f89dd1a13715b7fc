"""The digits job on a two-node Ray cluster on this machine, as on a real one: a head and a second
node started as separate `ray start` processes (token authentication on), an `mlflow server` as the
shared tracking server, the job sent with `ray job submit`; then the second node killed mid-run and
started again. See cluster/README.md for the real thing.

    flock /tmp/densenet_ray_heavy.lock .venv/bin/python -m pytest tests/test_multinode.py

Both nodes share this machine's filesystem, so checkpoint storage is a local folder here; on a real
cluster it must be storage every node reaches (s3://, gs://, NFS).
"""

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
import torch
from mlflow import MlflowClient
from servers import free_port, stop_group, the_run, wait_until_healthy

from densenet_ray import checkpoint, trained
from densenet_ray.tracking.registry import load_registered_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The driver refuses 127.0.0.1 and localhost as the tracking server of a multi-node cluster (on real
# nodes each would reach itself). 127.0.0.2 is loopback too, so every node of this machine reaches
# it: it stands for the head's address, where a real cluster would run its server.
MLFLOW_HOST = "127.0.0.2"

pytestmark = pytest.mark.slow


@pytest.fixture()
def mlflow_server(tmp_path):
    """`mlflow server` on loopback with a SQL store and proxied artifacts (the workers upload the model
    through it, as they do on a cluster); its URI."""
    port = free_port(MLFLOW_HOST)
    uri = f"http://{MLFLOW_HOST}:{port}"
    log = open(tmp_path / "mlflow-server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", MLFLOW_HOST, "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--artifacts-destination", str(tmp_path / "mlflow-artifacts"),
         "--allowed-hosts", f"{MLFLOW_HOST}:{port}"],  # its default list has 127.0.0.1 only
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    wait_until_healthy(server, f"{uri}/health", tmp_path / "mlflow-server.log", "mlflow server")
    yield uri
    stop_group(server)


class Cluster:
    """The dashboard's REST API (what `ray job` and `ray list` use), with the cluster's token."""

    def __init__(self, nodes):
        self.nodes, self.token = nodes, nodes.env["RAY_AUTH_TOKEN"]

    def get(self, path: str, *, token: bool = True):
        request = urllib.request.Request(self.nodes.dashboard + path)
        if token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def node_states(self) -> dict[str, dict]:
        """node id -> {"state": ALIVE/DEAD, "is_head_node": bool, ...}, dead nodes included."""
        rows = self.get("/api/v0/nodes?limit=1000&detail=true")["data"]["result"]["result"]
        return {row["node_id"]: row for row in rows}

    def alive_nodes(self) -> set[str]:
        return {n for n, row in self.node_states().items() if row["state"] == "ALIVE"}

    def train_worker_nodes(self) -> list[str]:
        """Node ids of the alive Ray Train workers (one entry per worker)."""
        rows = self.get("/api/v0/actors?limit=10000&detail=true")["data"]["result"]["result"]
        return [r["node_id"] for r in rows if r["class_name"] == "RayTrainWorker" and r["state"] == "ALIVE"]

    def job(self, submission_id: str) -> dict:
        return self.get(f"/api/jobs/{submission_id}")

    def logs(self, submission_id: str) -> str:
        return self.get(f"/api/jobs/{submission_id}/logs")["logs"]

    def wait_for(self, what: str, condition, timeout_s: float, job: str | None = None):
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if job and self.job(job)["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                pytest.fail(f"job {job} ended ({self.job(job)['status']}) while waiting for {what}:\n"
                            f"{self.logs(job)[-6000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout_s:.0f} s" + (f":\n{self.logs(job)[-6000:]}" if job else ""))
            time.sleep(1)

    def wait_for_end(self, submission_id: str, timeout_s: float) -> str:
        self.wait_for(f"end of job {submission_id}", lambda: self.job(submission_id)["status"] in (
            "SUCCEEDED", "FAILED", "STOPPED"), timeout_s)
        return self.job(submission_id)["status"]


@pytest.fixture()
def cluster(ray_nodes):
    """A 4-CPU head and a 2-CPU second node; each Ray Train worker takes 1 CPU, the rest is Ray Data's."""
    # A token of the test's own, as the cluster's Secret would hold it (not ~/.ray/auth_token, which
    # other Ray instances on this machine share). The job's driver and workers inherit the nodes'
    # environment, as pods inherit their containers'.
    ray_nodes.env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    ray_nodes.start("head", head=True, num_cpus=4)
    ray_nodes.start("worker", num_cpus=2)
    cluster = Cluster(ray_nodes)
    cluster.wait_for("second node", lambda: len(cluster.alive_nodes()) == 2, 60)
    return cluster


def submit(cluster: Cluster, tmp_path, run_name: str, uri: str, *flags: str) -> str:
    """`ray job submit --no-wait` of the digits job with both workers forced onto different nodes;
    the submission id."""
    submission_id = f"{run_name}-{secrets.token_hex(4)}"
    command = [os.path.join(cluster.nodes.bin, "ray"), "job", "submit", "--no-wait", "--address",
               cluster.nodes.dashboard, "--submission-id", submission_id, "--working-dir", REPO, "--",
               "python", "-m", "densenet_ray.train", "digits", "--workers", "2",
               "--placement-strategy", "STRICT_SPREAD", "--data", str(tmp_path / "digits"),
               "--storage", str(tmp_path / "runs"), "--run-name", run_name, "--mlflow-tracking-uri", uri, *flags]
    done = subprocess.run(command, env=cluster.nodes.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return submission_id


def assert_tracked_once(uri: str, run_name: str, epochs: int, storage):
    """One finished run with every epoch's metrics exactly once, and one registered model version
    of it, loaded from the server (its files went through the server's artifact proxy), that computes
    what the run's final checkpoint computes."""
    client, run = the_run(uri, run_name)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_top1_err", "lr", "images_per_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(epochs)), f"{key}: steps {sorted(steps)}"
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert len(versions) == 1 and versions[0].name == "densenet-digits"
    assert client.get_model_version_by_alias("densenet-digits", "candidate").version == versions[0].version
    model = load_registered_model(f"models:/densenet-digits/{versions[0].version}", tracking_uri=uri)
    state, _ = checkpoint.load(os.path.join(storage, run_name))
    assert state["epoch"] == epochs - 1 and state["run_id"] == run.info.run_id
    with torch.no_grad():
        torch.testing.assert_close(model(state["example"]), trained.rebuild(state)(state["example"]), atol=1e-5, rtol=0)
    return client, run


def test_job_runs_on_two_nodes_and_tracks_to_the_shared_server(cluster, mlflow_server, tmp_path):
    """`ray job submit` of the digits job: one training worker on each node, the run and its model
    in the shared MLflow server."""
    with pytest.raises(urllib.error.HTTPError) as refused:  # token authentication is on
        cluster.get("/api/jobs/", token=False)
    assert refused.value.code in (401, 403)

    head = next(n for n, row in cluster.node_states().items() if row["is_head_node"])
    job = submit(cluster, tmp_path, "two-nodes", mlflow_server, "--epochs", "3", "--max-failures", "0")
    placed = cluster.wait_for("2 training workers", lambda: (w := cluster.train_worker_nodes()) and len(w) == 2 and w,
                              600, job=job)
    assert len(set(placed)) == 2 and set(placed) == cluster.alive_nodes() and head in placed, placed

    status = cluster.wait_for_end(job, 600)
    logs = cluster.logs(job)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "done: 'two-nodes', 3 epochs" in logs
    assert_tracked_once(mlflow_server, "two-nodes", 3, tmp_path / "runs")


def logged_epochs(uri: str, run_name: str) -> int:
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{run_name}'")
    return len(client.get_metric_history(runs[0].info.run_id, "val_top1_err")) if runs else 0


def kill_node(nodes, name: str) -> None:
    """SIGKILL every process of node `name` (its `ray start`, raylet, workers: the process session it
    was started in), as when a machine dies: nothing shuts down cleanly."""
    proc = nodes.nodes.pop(name)
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.kill()
        except (ProcessLookupError, psutil.Error):
            pass
    proc.wait(timeout=30)


def test_training_survives_losing_a_node_and_resumes_when_it_is_back(cluster, mlflow_server, tmp_path):
    """The second node dies after the third epoch: the job waits for capacity (its two workers must be
    on two nodes), goes on from the last checkpoint once a node joins again, and ends with every
    epoch once in MLflow and one registered model."""
    epochs, run_name = 6, "node-lost"
    first = {n for n, row in cluster.node_states().items() if not row["is_head_node"]}
    job = submit(cluster, tmp_path, run_name, mlflow_server, "--epochs", str(epochs), "--max-failures", "1")
    cluster.wait_for("3 epochs in MLflow", lambda: logged_epochs(mlflow_server, run_name) >= 3, 600, job=job)

    kill_node(cluster.nodes, "worker")
    cluster.wait_for("second node marked dead", lambda: cluster.alive_nodes().isdisjoint(first), 120)
    time.sleep(10)  # the job waits: its workers cannot be placed on one node
    logged = logged_epochs(mlflow_server, run_name)  # final: no epoch ends without both workers
    assert cluster.job(job)["status"] == "RUNNING" and logged < epochs, cluster.logs(job)[-6000:]

    try:  # a new node joins (new node id)
        cluster.nodes.start("worker", num_cpus=2)
    except RuntimeError:  # on a loaded machine the GCS can miss `ray start`'s 30 s registration deadline
        cluster.nodes.start("worker", num_cpus=2)
    second = cluster.wait_for("replacement node", lambda: cluster.alive_nodes() - first - {
        n for n, row in cluster.node_states().items() if row["is_head_node"]}, 60)
    cluster.wait_for("a training worker on the new node",
                     lambda: set(cluster.train_worker_nodes()) & second, 300, job=job)

    status = cluster.wait_for_end(job, 900)
    logs = cluster.logs(job)
    assert status == "SUCCEEDED", logs[-6000:]
    assert f"done: '{run_name}', {epochs} epochs" in logs
    client, run = assert_tracked_once(mlflow_server, run_name, epochs, tmp_path / "runs")
    # From the last checkpoint Ray Train had registered: the last epoch logged, or the one before
    # when the node died between the epoch's report and the controller's next poll of the workers.
    resumed = int(run.data.tags["densenet_ray.resumed_after_epoch"])
    assert logged - 2 <= resumed <= logged - 1, f"resumed after epoch {resumed}, {logged} epochs were logged"
