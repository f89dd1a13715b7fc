"""Servers the tests start on this machine (mlflow server, Ray nodes, an S3 API) and what they read back.

    from servers import free_port, wait_until_healthy, stop_group, the_run, train_workers
    with S3Server() as s3: ...          # moto's S3 API on 127.0.0.1, a bucket, s3.env for the clients
    start_mlflow_server(folder, artifacts="s3://bucket/mlflow", env=s3.env)
"""

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pyarrow.fs as pafs
import pytest
from mlflow import MlflowClient


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, url: str, log, what: str, timeout_s: float = 120.0) -> None:
    """Until `url` answers; a process that exits or never answers fails the test with its `log`'s tail."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_group(process, grace_s=0)
                pytest.fail(f"{what} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def stop_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop a process started with start_new_session=True and everything it started: SIGTERM, then
    SIGKILL after `grace_s` (at once when 0: a crash)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM if grace_s else signal.SIGKILL)
    try:
        process.wait(timeout=grace_s or None)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def train_workers() -> list:
    """The Ray Train workers (psutil.Process) of the local Ray this process started: its raylet is
    this process's child, the workers are the raylet's."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.name().startswith("ray::RayTrainWork")]


def the_run(uri: str, run_name: str):
    """(client, run): the one MLflow run named `run_name` in any experiment."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, f"expected one MLflow run named {run_name!r}, found {len(runs)}"
    return client, runs[0]


class S3Server:
    """moto's S3 API in this process (a thread, 127.0.0.1, a port of its own), with `bucket` made:
    an S3-compatible endpoint as MinIO or Ceph would be. `env` holds what a client is given, the
    same settings a person sets for any such endpoint: the AWS SDKs (pyarrow's S3FileSystem,
    boto3 in the MLflow server) read them."""

    def __init__(self, bucket: str = "densenet"):
        self.bucket = bucket
        self.server = None

    def __enter__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "densenet-test",
                    "AWS_SECRET_ACCESS_KEY": "densenet-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_REGION": "us-east-1",
                    # no credentials found must never mean asking 169.254.169.254 (EC2's metadata service)
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self.filesystem().create_dir(self.bucket)  # a bucket: pyarrow creates none unless told to
        return self

    def __exit__(self, *exc):
        self.server.stop()

    def filesystem(self) -> pafs.S3FileSystem:
        """A client of its own, configured explicitly: what the tests read back does not depend on
        the environment the code under test is given."""
        return pafs.S3FileSystem(access_key=self.env["AWS_ACCESS_KEY_ID"], secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
                                 region=self.env["AWS_REGION"], endpoint_override=self.endpoint,
                                 allow_bucket_creation=True)

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object under `prefix` in the bucket, relative to the bucket, sorted."""
        root = f"{self.bucket}/{prefix}".rstrip("/")
        found = self.filesystem().get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return sorted(i.path.removeprefix(f"{self.bucket}/") for i in found if i.type == pafs.FileType.File)


def start_mlflow_server(folder, *, host: str = "127.0.0.1", artifacts: str | None = None,
                        env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """(process, URI): `mlflow server` in its own process group with a SQLite store in `folder`,
    serving artifacts from `artifacts` (a folder or URI; default folder/artifacts) through its
    proxy, as the cluster's does. Stop it with stop_group."""
    import sys

    port = free_port(host)
    uri = f"http://{host}:{port}"
    log = folder / "mlflow-server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--serve-artifacts",
         "--artifacts-destination", artifacts or str(folder / "artifacts"), "--allowed-hosts", f"{host}:{port}"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        # No background job runner: five more processes the tests do not use.
        env={**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    wait_until_healthy(process, f"{uri}/health", log, "mlflow server")
    return process, uri
