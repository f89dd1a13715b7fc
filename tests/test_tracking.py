"""densenet_ray.tracking against a real SQLite tracking store in a tmp folder: where runs land,
the checks that fail before training, one MLflow run per training run across crashes and resumes."""

import importlib.util
import json
import logging
import time

import pytest
from mlflow import MlflowClient

from densenet_ray import plots
from densenet_ray.tracking.runlog import RunLogger
from densenet_ray.tracking.uri import TrackingError, check_tracking, resolve_tracking_uri


def history(uri, run_id, key):
    return [(m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, key),
                                             key=lambda m: m.step)]


def test_tracking_uri_is_flag_then_env_then_embedded_store(home, monkeypatch):
    assert resolve_tracking_uri(None) == f"sqlite:///{home}/mlflow/mlflow.db"
    assert (home / "mlflow" / "artifacts").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert resolve_tracking_uri(None) == "http://head:5000"
    assert resolve_tracking_uri("http://other:5001") == "http://other:5001"


def test_check_accepts_the_embedded_store_on_one_node(home):
    check_tracking(resolve_tracking_uri(None))


@pytest.mark.parametrize("uri, message", [
    ("sqlite:///{tmp}/a_file/mlflow.db", "not a writable folder"),
    ("{tmp}/a_file/runs", "not a writable folder"),
    ("sqlite:///{tmp}/junk.db", "cannot open"),
    ("sqlite://", "in-memory"),
    ("ftp://head/runs", "not supported"),
])
def test_check_refuses_unusable_stores(tmp_path, uri, message):
    (tmp_path / "a_file").write_text("a file, not a folder")
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(TrackingError, match=message) as error:
        check_tracking(uri.format(tmp=tmp_path))
    assert "tracking URI" in str(error.value)


@pytest.mark.parametrize("uri", [
    None, "file:///tmp/mlruns", "/tmp/mlruns", "http://127.0.0.1:5000", "http://localhost:5000",
])
def test_check_refuses_stores_other_nodes_cannot_reach(home, uri):
    uri = uri or resolve_tracking_uri(None)
    with pytest.raises(TrackingError, match="other nodes") as error:
        check_tracking(uri, multi_node=True)
    assert "mlflow server" in str(error.value) and "http://HEAD_IP:5000" in str(error.value)


def test_run_records_params_tags_metrics_and_artifacts(home):
    uri = resolve_tracking_uri(None)
    run = RunLogger.start(uri, "cifar", "run-a", params={"lr": 0.1, "opt": {"wd": 1e-4}},
                          tags={"workers": 2, "devices": "cpu"})
    epochs = [{"epoch": e, "train_loss": 2.0 / (e + 1), "val_top1_err": 0.9 - 0.1 * e}
              for e in range(3)]
    for metrics in epochs:
        run.log_epoch(metrics["epoch"], metrics)
    run.log_artifact_dict("config.json", {"lr": 0.1, "arch": "densenet40_k12"})
    run.log_artifact_dict("class_index.json", ["cat", "dog"])
    run.log_file("training_curves.png", plots.curves(epochs))
    run.finish()

    client = MlflowClient(uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run-a"
    assert logged.data.params == {"lr": "0.1", "opt.wd": "0.0001"}
    assert logged.data.tags["workers"] == "2" and logged.data.tags["devices"] == "cpu"
    assert logged.data.tags["torch_version"] and logged.data.tags["mlflow_version"]
    assert history(uri, run.run_id, "val_top1_err") == [(0, 0.9), (1, 0.8), (2, pytest.approx(0.7))]
    # The embedded store keeps artifacts beside the database, not in the job's ./mlruns.
    folder = home / "mlflow" / "artifacts" / run.run_id / "artifacts"
    assert json.loads((folder / "config.json").read_text())["arch"] == "densenet40_k12"
    assert json.loads((folder / "class_index.json").read_text()) == ["cat", "dog"]
    assert (folder / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resubmitted_run_continues_by_name_with_each_epoch_once(home):
    uri = resolve_tracking_uri(None)
    first = RunLogger.start(uri, "cifar", "run-b", params={"lr": 0.1})
    for epoch in (0, 1):
        first.log_epoch(epoch, {"loss": 1.0 + epoch})
    first.log_epoch(1, {"loss": 99.0})  # the same epoch again in one process: ignored
    # The driver dies here: no finish(). The job is resubmitted under the same name and
    # re-reports epoch 1 (trained again from the epoch-0 checkpoint).
    again = RunLogger.start(uri, "cifar", "run-b", params={"lr": 0.1})
    assert again.run_id == first.run_id
    for epoch in (1, 2):
        again.log_epoch(epoch, {"loss": 10.0 + epoch})
    again.finish()
    assert history(uri, first.run_id, "loss") == [(0, 1.0), (1, 2.0), (2, 12.0)]

    # Finished: the same name now starts a new training run.
    fresh = RunLogger.start(uri, "cifar", "run-b", params={"lr": 0.1})
    assert fresh.run_id != first.run_id
    fresh.finish()


def test_resume_by_run_id_reopens_a_finished_run(home, caplog):
    uri = resolve_tracking_uri(None)
    run = RunLogger.start(uri, "cifar", "run-c", params={"lr": 0.1, "epochs": 2})
    run.log_epoch(0, {"loss": 1.0})
    run.finish()
    resumed = RunLogger.start(uri, "cifar", "other-name", run_id=run.run_id,
                              params={"lr": 0.1, "epochs": 4, "resume": True})
    client = MlflowClient(uri)
    assert resumed.run_id == run.run_id
    assert client.get_run(run.run_id).info.status == "RUNNING"
    resumed.log_epoch(0, {"loss": 5.0})
    resumed.log_epoch(1, {"loss": 0.5})
    resumed.finish()

    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert history(uri, run.run_id, "loss") == [(0, 1.0), (1, 0.5)]
    # MLflow cannot change a parameter: the first value stays, the new one is a tag and a warning.
    assert logged.data.params == {"lr": "0.1", "epochs": "2", "resume": "True"}
    assert logged.data.tags["resumed_with.epochs"] == "4"
    assert any("epochs" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_unknown_run_id_and_bad_metrics_are_refused(home):
    uri = resolve_tracking_uri(None)
    with pytest.raises(TrackingError, match="not in the tracking store"):
        RunLogger.start(uri, "cifar", "run-d", run_id="0" * 32, params={})
    run = RunLogger.start(uri, "cifar", "run-d", params={})
    with pytest.raises(TypeError, match="'lr' at epoch 3"):
        run.log_epoch(3, {"lr": "fast"})
    run.finish()


def test_system_metrics_are_recorded_when_psutil_is_installed(home, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # seconds
    uri = resolve_tracking_uri(None)
    run = RunLogger.start(uri, "cifar", "run-e", params={})
    time.sleep(1.5)
    run.finish()
    keys = MlflowClient(uri).get_run(run.run_id).data.metrics
    if importlib.util.find_spec("psutil"):
        assert "system/cpu_utilization_percentage" in keys
    else:  # MLflow needs psutil for them and does not install it: say so, carry on
        assert not keys
        assert any("psutil" in r.getMessage() for r in caplog.records)
