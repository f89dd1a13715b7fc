"""Results of a trained model (evaluate, analyze) written to MLflow: into the run that trained it,
or a new run "eval-RUN_NAME" when that run is not in the store (a checkpoint from elsewhere).

    run_id = record(uri, model.run_id, experiment="densenet_ray", run_name="digits-r1",
                    source="models:/densenet-digits@champion", metrics={"test_top1_err": 0.04})
"""

from __future__ import annotations

import time

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from densenet_ray.tracking.runlog import experiment_id, run_status


def record(uri: str, run_id: str | None, *, experiment: str, run_name: str, source: str,
           metrics: dict | None = None, tags: dict | None = None, artifacts: list[str] = (),
           artifact_dir: str | None = None) -> str:
    """Log `metrics` ({name: number}, at step 0), `tags` and the files `artifacts` (into the folder
    `artifact_dir` of the run) to run `run_id` in the store at `uri`, else to a new run named
    eval-`run_name` in `experiment` (tagged with the model `source`). Returns the run id."""
    client = MlflowClient(uri)
    new = not run_id or run_status(uri, run_id) is None
    if new:
        run_id = client.create_run(experiment_id(client, uri, experiment), run_name=f"eval-{run_name or 'model'}",
                                   tags={"densenet_ray.model": source}).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
    for local in artifacts:
        client.log_artifact(run_id, local, artifact_dir)
    if new:
        client.set_terminated(run_id)
    return run_id
