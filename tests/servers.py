"""Servers the tests start on this machine (mlflow server, Ray nodes) and what they read back.

    from servers import free_port, wait_until_healthy, stop_group, the_run
"""

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request

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


def the_run(uri: str, run_name: str):
    """(client, run): the one MLflow run named `run_name` in any experiment."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, f"expected one MLflow run named {run_name!r}, found {len(runs)}"
    return client, runs[0]
