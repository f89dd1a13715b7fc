"""`ray job submit` against a real cluster started with `ray start --head` (token authentication on,
as Ray 2.60 starts it), the way users run the main job."""

import os
import subprocess

import pytest
from mlflow import MlflowClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_ray_job_submit_runs_the_digits_job(ray_nodes, tmp_path):
    ray_nodes.start("head", head=True, num_cpus=4)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    submit = [os.path.join(ray_nodes.bin, "ray"), "job", "submit", "--address", ray_nodes.dashboard,
              "--working-dir", REPO, "--", "python", "-m", "densenet_ray.train", "digits", "--epochs", "2",
              "--data", str(tmp_path / "digits"), "--storage", str(tmp_path / "runs"),
              "--mlflow-tracking-uri", uri, "--run-name", "submitted", "--max-failures", "0"]
    job = subprocess.run(submit, env=ray_nodes.env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout and "done: 'submitted', 2 epochs" in job.stdout

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="attributes.run_name = 'submitted'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "val_top1_err")) == 2
