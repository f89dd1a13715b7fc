"""Shared fixtures: one local Ray instance for the whole session (ray.init takes ~2 s and a
busy 2-core machine makes every extra start expensive)."""

import os

import pytest
from servers import free_port


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance shared by every test that needs one; stopped at the end."""
    import ray

    if not ray.is_initialized():
        # Every Ray worker inherits it: a test whose S3 credentials went missing fails, instead of asking
        # 169.254.169.254 (EC2's metadata service) for them, as the AWS SDKs do last.
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        # 4 logical CPUs on a 2-core machine: two 1-CPU training workers must leave room for
        # Ray Data's read/decode tasks, or the pipeline starves and the test hangs.
        # address="local": always a fresh instance of our own, never a cluster `ray start` left here.
        # The dashboard, as on every real cluster: Ray Train's PlacementGroupCleaner asks its state
        # API whether a controller died (a Tune trial stopped early) and frees its workers' CPUs.
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=free_port(), log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()},
                              "worker_process_setup_hook": "densenet_ray.preempt.install"})  # as runtime.connect
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory):
    """An empty MLflow database, made once: creating a new one takes seconds of migrations."""
    import contextlib

    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("template")
    with contextlib.chdir(folder):  # where the Default experiment keeps its artifacts: ./mlruns
        MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def home(tmp_path, monkeypatch, migrated_db):
    """A densenet_ray home with an empty embedded store; MLFLOW_TRACKING_URI unset so that is used."""
    import shutil

    monkeypatch.setenv("DENSENET_RAY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "home" / "mlflow").mkdir(parents=True)
    shutil.copy(migrated_db, tmp_path / "home" / "mlflow" / "mlflow.db")
    return tmp_path / "home"


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    """scikit-learn's digits converted into shards, once per test module that trains on them."""
    from densenet_ray.data import sources, write

    out = tmp_path_factory.mktemp("data") / "digits"
    write.convert(sources.digits(), str(out), progress=False)
    return str(out)


@pytest.fixture()
def places(tmp_path):
    """Checkpoint storage and an embedded MLflow store of the test's own."""
    return {"storage": str(tmp_path / "runs"), "uri": f"sqlite:///{tmp_path}/mlflow.db"}


class RayNodes:
    """A real multi-process Ray cluster on this machine, as `ray start` makes one: a head, and
    optionally more nodes joining it. Every node runs `ray start --block` in its own process
    group, so stopping it (SIGTERM to the group) takes down exactly its processes, not those of
    other Ray instances here (unlike `ray stop`)."""

    def __init__(self, tmp_path):
        import sys

        self.tmp = tmp_path
        self.bin = os.path.dirname(sys.executable)
        # Job drivers run `python` from the PATH the node started with: this interpreter's.
        self.env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes = {}
        self.temp_dirs = []
        self.gcs_port, self.dashboard_port = free_port(), free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, name: str, *, head: bool = False, num_cpus: int = 2, resources: str | None = None) -> None:
        import subprocess
        import tempfile
        import time

        # A temp dir of each node's own, as on separate machines: nodes sharing one unpack the job's
        # working_dir into the same folder, one while the other's driver imports from it. Short:
        # it holds Unix sockets (107 characters at most).
        self.temp_dirs.append(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        args = [os.path.join(self.bin, "ray"), "start", "--block", f"--num-cpus={num_cpus}",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.temp_dirs[-1]}"]
        if head:
            args += ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                     "--include-dashboard=true"]
        else:
            args += [f"--address={self.address}"]
        if resources:
            args += [f"--resources={resources}"]
        before = 0 if head else self.alive_nodes()
        log = open(self.tmp / f"ray-{name}.log", "w")
        self.nodes[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + 120
        while not (self._dashboard_up() if head else self.alive_nodes() > before):
            if self.nodes[name].poll() is not None or time.monotonic() > deadline:
                self.stop(name)
                raise RuntimeError(f"ray start for {name} failed:\n{(self.tmp / f'ray-{name}.log').read_text()}")
            time.sleep(1)

    def _dashboard_up(self) -> bool:
        import urllib.request

        try:  # public under token authentication (/api/version answers 401 without the token)
            urllib.request.urlopen(f"{self.dashboard}/api/gcs_healthz", timeout=2)
            return True
        except OSError:
            return False

    def alive_nodes(self) -> int:
        """Nodes the cluster counts as alive (0 while the dashboard does not answer)."""
        import json
        import urllib.request
        from pathlib import Path

        # `ray start --head` writes ~/.ray/auth_token unless RAY_AUTH_TOKEN gives one.
        token = self.env.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
        request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=1000",
                                         headers={"Authorization": f"Bearer {token}"})
        try:
            rows = json.loads(urllib.request.urlopen(request, timeout=10).read())["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(row["state"] == "ALIVE" for row in rows)

    def stop(self, name: str) -> None:
        import signal

        proc = self.nodes.pop(name, None)
        if proc and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)  # `ray start --block` takes ~30 s to wind down; nothing to keep
            except Exception:  # noqa: BLE001 - escalate below
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        import shutil

        for name in reversed(list(self.nodes)):
            self.stop(name)
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        # `ray start --head` recorded this cluster for later `ray.init()` calls to join: forget it.
        from densenet_ray.runtime import recorded_cluster, recorded_cluster_file

        if (recorded_cluster() or "").endswith(f":{self.gcs_port}"):
            os.remove(recorded_cluster_file())


@pytest.fixture()
def ray_nodes(tmp_path):
    nodes = RayNodes(tmp_path)
    yield nodes
    nodes.stop_all()
