"""The tracking server exactly as cluster/kuberay/mlflow.yaml runs it (its container's script and
environment, Secrets filled in), here on loopback with SQLite and a local artifact folder standing in
for PostgreSQL and S3: it refuses the Secret template's placeholder password, answers nobody without
a user, refuses foreign Host headers, and lets the training user that cluster/README.md creates log
runs, upload artifacts through its proxy and register models.

    .venv/bin/python -m pytest tests/test_cluster_mlflow.py     # ~30 s; needs mlflow[auth] (Flask-WTF)
"""

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from cluster_files import KUBERAY, documents, of_kind
from mlflow import MlflowClient
from servers import free_port, stop_group, wait_until_healthy

from densenet_ray.tracking.uri import TrackingError, check_tracking

TRAINER = "densenet-trainer"


def container() -> dict:
    deployment = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def local_script(port: int) -> str:
    """The container's script, listening on 127.0.0.1:`port` instead of the pod's 0.0.0.0:5000."""
    script = container()["args"][0]
    for old in ("--host 0.0.0.0", "--port 5000", "--workers 2", ":5000"):
        assert old in script, f"cluster/kuberay/mlflow.yaml changed: no {old!r}; update this test"
    return (script.replace("--host 0.0.0.0", "--host 127.0.0.1").replace("--port 5000", f"--port {port}")
            .replace("--workers 2", "--workers 1").replace(":5000", f":{port}"))


def local_env(tmp_path, admin_password: str) -> dict:
    """The container's environment as the kubelet would make it, with the stores on this machine."""
    values = {("mlflow-server", "admin-password"): admin_password,
              ("mlflow-server", "postgres-password"): secrets.token_hex(8),
              ("mlflow-server", "flask-secret-key"): secrets.token_hex(16)}
    env = {}
    for e in container()["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        env[e["name"]] = values[ref["name"], ref["key"]] if ref else re.sub(
            r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])  # Kubernetes' $(VAR) expansion
    local = {"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
             "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth.db",
             "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"), "TMPDIR": str(tmp_path)}
    assert local.keys() <= env.keys(), "cluster/kuberay/mlflow.yaml changed its environment; update this test"
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, **env, **local, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_the_server_refuses_the_templates_placeholder_password(tmp_path):
    placeholder = next(d for d in documents(KUBERAY / "secrets.template.yaml")
                       if d["metadata"]["name"] == "mlflow-server")["stringData"]["admin-password"]
    done = subprocess.run(["/bin/sh", "-ec", local_script(free_port())], env=local_env(tmp_path, placeholder),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "admin-password in Secret mlflow-server" in done.stderr, done.stderr


@pytest.fixture()
def server(tmp_path):
    port, password = free_port(), secrets.token_hex(12)
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen(["/bin/sh", "-ec", local_script(port)], env=local_env(tmp_path, password),
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_until_healthy(process, f"{uri}/health", tmp_path / "server.log", "the server of cluster/kuberay/mlflow.yaml "
                       "(`pip install mlflow[auth]` if Flask-WTF is missing)")
    yield {"uri": uri, "port": port, "admin": ("admin", password), "artifacts": tmp_path / "artifacts"}
    stop_group(process)


def call(server, path: str, *, user=None, host: str | None = None, body: dict | None = None) -> int:
    """HTTP status of a request to the server, as `user` (name, password), with a Host header."""
    request = urllib.request.Request(server["uri"] + path, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(user).encode()).decode())
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=30):
            return 200
    except urllib.error.HTTPError as e:
        return e.code


def test_the_server_needs_a_user_and_an_allowed_host_and_serves_the_trainer(server, monkeypatch):
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    port = server["port"]
    assert call(server, search) == 401
    assert call(server, search, user=("admin", "wrong")) == 401
    assert call(server, search, user=server["admin"], host=f"mlflow:{port}") == 200   # the Service name
    assert call(server, search, user=server["admin"], host=f"attacker.example:{port}") in (400, 403)

    # cluster/README.md, step 4: the admin creates the training user (not an admin)
    password = secrets.token_hex(12)
    assert call(server, "/api/2.0/mlflow/users/create", user=server["admin"],
                body={"username": TRAINER, "password": password}) == 200

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", TRAINER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(TrackingError):
        check_tracking(server["uri"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    check_tracking(server["uri"], multi_node=False)

    client = MlflowClient(server["uri"])
    run = client.create_run(client.create_experiment("densenet_ray"))
    client.log_metric(run.info.run_id, "val_top1_err", 0.25, step=0)
    client.log_text(run.info.run_id, "through the proxy", "notes/hello.txt")
    assert [p.read_text() for p in server["artifacts"].rglob("hello.txt")] == ["through the proxy"]
    client.create_registered_model("densenet-digits")
    assert client.get_registered_model("densenet-digits").name == "densenet-digits"
