"""densenet_ray.tracking against a real `mlflow server` on 127.0.0.1: the start-up check, a
server outage in the middle of a run, and the registry through the server's artifact proxy."""

import http.server
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from servers import free_port
from torch import nn

from densenet_ray.tracking.registry import load_registered_model, log_and_register
from densenet_ray.tracking.runlog import RunLogger
from densenet_ray.tracking.uri import TrackingError, check_tracking


class MlflowServer:
    """`mlflow server` in its own process group, restartable on the same port and store."""

    def __init__(self, folder):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout_s: float = 90.0) -> None:
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # No background job runner: five more processes this test does not use.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.25)
        self.stop()
        pytest.fail(f"mlflow server not up in {timeout_s} s")

    def stop(self) -> None:
        """Kill it, as a crash would (no graceful shutdown)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake_server():
    """A plain HTTP server answering /health and the API with the codes set in `answers`."""
    answers = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code, body = answers.get(self.path.split("?")[0], (404, b"no such page"))
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", answers
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def answer_losing_proxy(server):
    """An HTTP proxy to `server`. While `proxy.lose_answers` is set it forwards log-batch calls
    and hangs up instead of answering: the points land, the client never hears so."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            request = urllib.request.Request(
                server.uri + self.path, data=body if self.command != "GET" else None,
                method=self.command, headers={"Content-Type": self.headers.get("Content-Type",
                                                                               "")})
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    code, payload = answer.status, answer.read()
            except urllib.error.HTTPError as e:
                code, payload = e.code, e.read()
            if httpd.lose_answers and self.path.endswith("/runs/log-batch"):
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.send_response(code)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = forward

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.lose_answers = False
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.uri = f"http://127.0.0.1:{httpd.server_port}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_check_accepts_a_running_server(server):
    check_tracking(server.uri)
    check_tracking(server.uri + "/")


def test_check_fails_fast_when_nothing_listens():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable") as error:
        check_tracking(uri)
    assert time.monotonic() - started < 10
    assert uri in str(error.value) and "mlflow server" in str(error.value)


def test_check_fails_fast_when_the_server_never_answers():
    with socket.socket() as silent:  # accepts connections (backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        with pytest.raises(TrackingError, match="no answer within 1 s"):
            check_tracking(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=1)
        assert time.monotonic() - started < 5


def test_check_refuses_other_servers_and_bad_credentials(fake_server):
    uri, answers = fake_server
    with pytest.raises(TrackingError, match="not an MLflow tracking server.*HTTP 404"):
        check_tracking(uri)
    answers["/health"] = (200, b"OK")
    answers["/api/2.0/mlflow/experiments/search"] = (401, b"")
    with pytest.raises(TrackingError, match="refused the credentials.*MLFLOW_TRACKING_USERNAME"):
        check_tracking(uri)
    answers["/api/2.0/mlflow/experiments/search"] = (200, b"<html>a web page</html>")
    with pytest.raises(TrackingError, match="did not answer JSON"):
        check_tracking(uri)


def test_outage_mid_run_loses_no_point_and_duplicates_none(server, caplog):
    caplog.set_level(logging.WARNING, logger="densenet_ray.tracking")
    run = RunLogger.start(server.uri, "outage", "run", params={"lr": 0.1}, step_timeout_s=2)
    other = RunLogger.start(server.uri, "outage", "other", params={})
    run.log_epoch(0, {"loss": 1.0, "val_top1_err": 0.9})

    server.stop()
    started = time.monotonic()
    run.log_epoch(1, {"loss": 0.5, "val_top1_err": 0.8})
    run.log_artifact_dict("config.json", {"lr": 0.1})
    run.log_epoch(2, {"loss": 0.25, "val_top1_err": 0.7})
    other.finish(wait_s=0)  # gives up, says what was lost, does not raise
    assert time.monotonic() - started < 10, "an outage must not stall training"
    warnings = [r for r in caplog.records if "queued" in r.getMessage()]
    assert len(warnings) == 1, "one warning per outage"

    server.start()
    run.log_epoch(3, {"loss": 0.125, "val_top1_err": 0.6})
    run.finish()
    client = MlflowClient(server.uri)
    for key, values in [("loss", [1.0, 0.5, 0.25, 0.125]), ("val_top1_err", [0.9, 0.8, 0.7, 0.6])]:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, key))
        assert points == list(enumerate(values))
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["config.json"]
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_registry_through_the_server(server):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5))
    with RunLogger.start(server.uri, "registry", "run", params={}) as run:
        example = np.random.default_rng(0).standard_normal((2, 3, 8, 8), dtype=np.float32)
        assert log_and_register(run.uri, run.run_id, model, registered_name="served", input_example=example,
                                          val_top1_err=0.5) == 1
    loaded = load_registered_model("models:/served@champion", tracking_uri=server.uri)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)


def test_points_whose_answer_was_lost_are_not_duplicated(server, answer_losing_proxy, caplog):
    proxy = answer_losing_proxy
    run = RunLogger.start(proxy.uri, "lost-answers", "run", params={}, step_timeout_s=2)
    proxy.lose_answers = True
    run.log_epoch(0, {"loss": 1.0})
    direct = MlflowClient(server.uri)
    assert len(direct.get_metric_history(run.run_id, "loss")) == 1  # it landed ...
    assert any("queued" in r.getMessage() for r in caplog.records)  # ... but is queued again
    proxy.lose_answers = False
    run.log_epoch(1, {"loss": 0.5})  # sends epoch 0 a second time
    run.finish()
    assert sorted((m.step, m.value) for m in direct.get_metric_history(run.run_id, "loss")) == [
        (0, 1.0), (1, 0.5)]
