"""Data, checkpoints and MLflow artifacts on an S3 API: moto's S3 server on 127.0.0.1 stands for MinIO,
Ceph or S3 itself. Every command runs as a person runs it, in its own process with the endpoint
settings (AWS_ENDPOINT_URL and friends) in its environment only, joined to the shared Ray
(RAY_ADDRESS) whose workers were started before those settings existed: they reach the workers
through the job, or the tests fail."""

import io
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
import torch
from mlflow import MlflowClient
from servers import S3Server, free_port, start_mlflow_server, stop_group, the_run, train_workers

from densenet_ray import checkpoint, storage
from densenet_ray.data import DataError, load_manifest, sources, write

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture()
def s3_env(s3, monkeypatch):
    """This process configured as a person would configure theirs for the endpoint."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3


def command(ray_local, s3, module: str, *args: str, timeout: float = 900, **extra_env) -> subprocess.CompletedProcess:
    """`python -m module args` joined to the shared Ray, with the S3 settings in its environment."""
    env = {**os.environ, **s3.env, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, **extra_env}
    return subprocess.run([sys.executable, "-m", module, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def digits_on_s3(s3, ray_local):
    """scikit-learn's digits converted by the CLI into the bucket (Ray tasks write the shards)."""
    done = command(ray_local, s3, "densenet_ray.data", "convert", "digits", s3.uri("data", "digits"))
    assert done.returncode == 0, done.stdout[-4000:]
    return s3.uri("data", "digits")


def test_convert_writes_shards_to_s3_and_verify_reads_them_back(digits_on_s3, s3, ray_local, monkeypatch):
    keys = s3.keys("data/digits")
    assert "data/digits/dataset.json" in keys
    assert any(k.startswith("data/digits/train/train-") and k.endswith(".parquet") for k in keys), keys
    assert any(k.startswith("data/digits/val/val-") and k.endswith(".parquet") for k in keys), keys
    done = command(ray_local, s3, "densenet_ray.data", "verify", digits_on_s3)
    assert done.returncode == 0 and f"{digits_on_s3}: OK" in done.stdout, done.stdout[-4000:]
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    m = load_manifest(digits_on_s3)
    assert (m.splits["train"].rows, m.splits["val"].rows, m.num_classes) == (1437, 360, 10)


def _state(epoch: int) -> dict:
    return {"model": {"w": torch.full((2,), float(epoch))}, "config": {"arch": "densenet_bc22_k12"}, "epoch": epoch}


def test_checkpoints_on_s3_are_found_and_loaded(s3_env, tmp_path):
    fs, run = s3_env.filesystem(), s3_env.uri("ckpt", "r1")
    for epoch in (0, 1):
        buffer = io.BytesIO()
        torch.save(_state(epoch), buffer)
        with fs.open_output_stream(f"{s3_env.bucket}/ckpt/r1/{checkpoint.folder_name(epoch)}/state.pt") as f:
            f.write(buffer.getvalue())
    # epoch 2's folder holds something but no state.pt yet: being copied when the job died
    with fs.open_output_stream(f"{s3_env.bucket}/ckpt/r1/epoch_0002/.partial") as f:
        f.write(b"x")
    assert checkpoint.newest(run) == f"{run}/epoch_0001/state.pt"
    assert checkpoint.next_epoch(run) == 2
    state, file = checkpoint.load(run)
    assert state["epoch"] == 1 and file == f"{run}/epoch_0001/state.pt"
    assert checkpoint.load(f"{run}/epoch_0000")[0]["epoch"] == 0
    assert checkpoint.newest(s3_env.uri("ckpt", "never-ran")) is None and checkpoint.next_epoch(s3_env.uri("ckpt", "x")) == 0
    with pytest.raises(checkpoint.CheckpointError, match="no such file or folder"):
        checkpoint.load(s3_env.uri("ckpt", "r1", "epoch_0009"))


def test_a_missing_bucket_is_an_error_that_names_it_and_the_settings(s3_env):
    with pytest.raises(DataError, match=r"OUT s3://no-such-bucket/digits: no bucket 'no-such-bucket'.*"
                                        + s3_env.endpoint.replace(".", r"\.")):
        write.convert(sources.digits(), "s3://no-such-bucket/digits", progress=False)
    with pytest.raises(DataError, match="no bucket 'no-such-bucket'.*AWS_ENDPOINT_URL"):
        load_manifest("s3://no-such-bucket/digits")
    with pytest.raises(storage.StorageError, match="--storage s3://no-such-bucket/runs: no bucket"):
        storage.check("s3://no-such-bucket/runs", "--storage")
    storage.check(s3_env.uri("runs"), "--storage")  # the bucket exists: nothing to say


def test_an_endpoint_that_does_not_answer_is_an_error_that_names_the_settings(s3_env, monkeypatch):
    nobody = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", nobody)
    with pytest.raises(storage.StorageError, match=f"s3://{s3_env.bucket}/runs: cannot reach it.*AWS_ENDPOINT_URL: "
                                                   + nobody.replace(".", r"\.")):
        storage.check(s3_env.uri("runs"), "--storage")
    with pytest.raises(checkpoint.CheckpointError, match="cannot reach it.*AWS_ENDPOINT_URL"):
        checkpoint.load(s3_env.uri("ckpt", "r1"))


@pytest.fixture(scope="module")
def mlflow_on_s3(s3, tmp_path_factory):
    """`mlflow server` keeping its artifacts in the bucket (boto3 in the server), serving them to the
    workers through its proxy: the workers need no S3 client for MLflow."""
    folder = tmp_path_factory.mktemp("mlflow_s3")
    process, uri = start_mlflow_server(folder, artifacts=s3.uri("mlflow"), env=s3.env)
    yield uri
    stop_group(process)


def train_flags(s3, data, uri, *extra):
    return ["digits", "--data", data, "--storage", s3.uri("runs"), "--mlflow-tracking-uri", uri,
            "--run-name", "on-s3", "--max-failures", "0", "--progress-s", "0", *extra]


@pytest.fixture(scope="module")
def first_run(s3, ray_local, digits_on_s3, mlflow_on_s3):
    """One epoch of digits from the bucket, checkpointed to the bucket, tracked by the server whose
    artifacts are in the bucket."""
    done = command(ray_local, s3, "densenet_ray.train", *train_flags(s3, digits_on_s3, mlflow_on_s3, "--epochs", "1"))
    return done


@pytest.mark.slow
def test_training_reads_s3_data_and_checkpoints_and_logs_its_model_to_s3(first_run, s3, mlflow_on_s3):
    assert first_run.returncode == 0, first_run.stdout[-6000:]
    assert "done: 'on-s3', 1 epochs" in first_run.stdout
    assert "runs/on-s3/epoch_0000/state.pt" in s3.keys("runs/on-s3")
    client, run = the_run(mlflow_on_s3, "on-s3")
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri  # through the proxy
    stored = s3.keys("mlflow")
    # the run's own files and the registered model's, in the bucket under the server's destination
    assert any(k.endswith(f"{run.info.run_id}/artifacts/config.json") for k in stored), stored
    version = client.get_model_version_by_alias("densenet-digits", "candidate")
    assert version.run_id == run.info.run_id
    model_files = [k for k in stored if "/models/" in k or k.startswith("mlflow/models")]
    assert any(k.endswith("MLmodel") for k in model_files), stored
    downloaded = client.download_artifacts(run.info.run_id, "config.json")  # read back through the server
    assert '"run_name": "on-s3"' in open(downloaded).read()


@pytest.mark.slow
def test_same_run_name_resumes_from_the_s3_checkpoint_and_a_killed_worker_inside_the_epoch(
        first_run, s3, ray_local, digits_on_s3, mlflow_on_s3):
    """The finished one-epoch run, given --epochs 2: epoch 1 from the bucket's epoch-0 checkpoint; in
    it a worker is SIGKILLed after a checkpoint inside the epoch in the bucket, and Ray Train resumes
    from that one, at its step."""
    assert first_run.returncode == 0, "the first run failed: see the test above"
    argv = train_flags(s3, digits_on_s3, mlflow_on_s3, "--epochs", "2", "--checkpoint-every-steps", "5",
                       "--max-failures", "1")
    env = {**os.environ, **s3.env, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "densenet_ray.train", *argv], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline, victim = time.monotonic() + 600, None
        while not any("epoch_0001_step_" in k and k.endswith("/state.pt") for k in s3.keys("runs/on-s3")):
            assert time.monotonic() < deadline and driver.poll() is None, "no checkpoint inside epoch 1 in the bucket"
            if victim is None and len(workers := train_workers()) == 2:
                victim = workers[-1]   # found before: walking the process tree takes longer than a step
            time.sleep(0.05)
        (victim or train_workers()[-1]).send_signal(signal.SIGKILL)
        out, _ = driver.communicate(timeout=900)
    finally:
        driver.kill()
    assert driver.returncode == 0, out[-6000:]
    assert "resumed run 'on-s3' from its checkpoint after epoch 0" in out, out[-6000:]
    step = int(re.findall(r"resumed run 'on-s3' inside epoch 2 of 2, after its step (\d+)", out)[0])
    assert step % 5 == 0, out[-6000:]
    keys = set(s3.keys("runs/on-s3"))
    assert {"runs/on-s3/epoch_0000/state.pt", "runs/on-s3/epoch_0001/state.pt"} <= keys
    assert not [k for k in keys if "_step_" in k], "checkpoints inside the finished epoch were kept"
    # The first run had FINISHED: more --epochs open a new MLflow run of that name (as with local
    # storage), which holds the checkpoint's epoch 0 as it was logged, and epoch 1.
    client = MlflowClient(mlflow_on_s3)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="attributes.run_name = 'on-s3'", order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert runs[1].data.tags["densenet_ray.resumed_at"] == f"epoch 1 step {step}"
    curves = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, "train_loss")} for r in runs]
    assert sorted(curves[0]) == [0] and sorted(curves[1]) == [0, 1], curves
    assert curves[1][0] == curves[0][0]   # epoch 0 from the checkpoint's history, not trained again
    fs = s3.filesystem()
    with fs.open_input_file(f"{s3.bucket}/runs/on-s3/epoch_0001/state.pt") as f:
        state = torch.load(io.BytesIO(f.read()), weights_only=True)
    assert state["epoch"] == 1 and [m["epoch"] for m in state["history"]] == [0, 1]
    assert isinstance(fs, pafs.S3FileSystem)


def test_the_s3_settings_of_the_driver_are_given_to_the_jobs_workers_unless_the_job_sets_them(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from densenet_ray import runtime

    for name in runtime.S3_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert runtime.forwarded_env() == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("HOME_OF_SOMETHING_ELSE", "x")
    assert runtime.forwarded_env() == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "key"}
    # `ray job submit --runtime-env-json` set the endpoint: Ray gives it to the workers, and refuses it twice
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR,
                       '{"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}}}')
    assert runtime.forwarded_env() == {"AWS_ACCESS_KEY_ID": "key"}
