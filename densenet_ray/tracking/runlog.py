"""One MLflow run per training run, with its parameters, per-epoch metrics, system metrics, tags
and artifacts, logged so that tracking-server outages do not stop training. Which URI and its
checks: `uri.py`; models and the registry: `registry.py`; evaluation results: `results.py`.

Used on rank 0, behind the training loop's single side-effect guard:

    uri = resolve_tracking_uri(cfg.mlflow_tracking_uri)   # flag > MLFLOW_TRACKING_URI > embedded
    check_tracking(uri, multi_node=num_nodes > 1)          # TrackingError within seconds
    with RunLogger.start(uri, "densenet", cfg.run_name, run_id=ckpt_run_id,
                         params=asdict(cfg), tags={"workers": 8}) as run:  # FAILED on an exception
        run.log_artifact_dict("config.json", asdict(cfg))
        for epoch in ...:
            run.log_epoch(epoch, metrics)                  # never raises on an outage
        run.log_file("training_curves.png", plots.curves(history))
        run.flush()                                    # then registry.log_and_register(uri, run.run_id, ...)

Outages: MLflow's own client retries a failing request for minutes. `log_epoch` instead queues its
points and makes one attempt per call with a short deadline (no MLflow retries), so a dead server
costs an epoch at most a few seconds; the queue is delivered by the next call that gets through, or
by `finish`. Exactly once: a point (key, epoch) already on the run (a resumed run re-reporting the
epochs after its last checkpoint) is skipped, and a queued point is re-sent unchanged, timestamp
included, so that when a send landed but its answer was lost, MLflow's SQL store (the embedded
default, and an `mlflow server` on a database) drops the identical copy. A server on a file store
(--backend-store-uri ./mlruns) would keep it twice.
"""

import contextlib
import importlib.metadata
import json
import logging
import math
import platform
import posixpath
import socket
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from densenet_ray.tracking.uri import TrackingError, artifact_root, temporary_env

_log = logging.getLogger(__name__)

# MLflow's per-request limits for log_batch (100 params / tags, 1000 metrics).
_MAX_PARAMS, _MAX_METRICS = 100, 1000


def _one_try(seconds: float):
    """MLflow's HTTP client without its retries (minutes by default), timing out in `seconds`."""
    return temporary_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                         MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, math.ceil(seconds))))


def _transient(e: MlflowException) -> bool:
    """Connection refused, timeouts, 5xx and 429: worth retrying. A 4xx is our bug."""
    status = e.get_http_status_code()
    return status >= 500 or status == 429


class _OutOfTime(Exception):
    pass


def environment_tags() -> dict[str, str]:
    """Versions that decide whether a run can be reproduced."""
    tags = {"python_version": platform.python_version(), "host": socket.gethostname()}
    for package in ("torch", "torchvision", "ray", "mlflow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"{package}_version"] = importlib.metadata.version(package)
    return tags


def _flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """{"opt": {"lr": 0.1}} -> {"opt.lr": "0.1"}: MLflow params are flat strings."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _quoted(text: str) -> str:
    """A string literal for MLflow's search filter."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ValueError(f"run name {text!r}: use either ' or \" in a run name, not both")


class RunLogger:
    """The MLflow run of one training run; make it with `RunLogger.start`, on rank 0 only."""

    def __init__(self, client: MlflowClient, uri: str, experiment_id: str, run_id: str,
                 *, step_timeout_s: float):
        self._client, self.uri, self.experiment_id, self.run_id = client, uri, experiment_id, run_id
        self._step_timeout_s = step_timeout_s
        self._seen: set[tuple[str, int]] = set()  # (key, step) on the server or queued
        self._pending: list[Metric] = []          # queued points, oldest first
        self._pending_files: dict[str, bytes] = {}
        self._outage = False  # warned about the current outage
        self._monitor = None

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, *, run_id: str | None = None,
              params: dict, tags: dict | None = None, system_metrics: bool = True,
              step_timeout_s: float = 5.0) -> "RunLogger":
        """Continue run `run_id` (a resume), else the newest unfinished run named `run_name`
        in `experiment` (the driver died and the job was resubmitted), else create one.

        Logs `params` (flattened; on a continued run only new keys, a changed value is kept
        as it was and warned about), `tags` plus environment_tags(), and starts MLflow's system
        metrics (needs psutil). `step_timeout_s` bounds each log_epoch during an outage.
        """
        client = MlflowClient(uri)
        exp_id = experiment_id(client, uri, experiment)
        if run_id is None:
            run_id = _unfinished_run(client, exp_id, run_name)
        if run_id is None:
            run = client.create_run(exp_id, run_name=run_name)
        else:
            try:
                run = client.get_run(run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise TrackingError(f"run {run_id} to continue is not in the tracking store "
                                    f"{uri} ({e.message}); was the checkpoint written with "
                                    "another --mlflow-tracking-uri?") from None
            client.update_run(run_id, status="RUNNING")
            _log.debug("continuing MLflow run %s (%s)", run_id, run.info.run_name)
        self = cls(client, uri, exp_id, run.info.run_id, step_timeout_s=step_timeout_s)
        self._log_params(run.data.params, _flatten(params))
        all_tags = [RunTag(k, str(v)) for k, v in {**environment_tags(), **(tags or {})}.items()]
        for i in range(0, len(all_tags), _MAX_PARAMS):
            client.log_batch(self.run_id, tags=all_tags[i:i + _MAX_PARAMS])
        self._seen = self._points_on_server(k for k in run.data.metrics
                                            if not k.startswith("system/"))
        if system_metrics:
            self._start_system_metrics(resume=run_id is not None)
        return self

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")

    def _log_params(self, logged: dict[str, str], params: dict[str, str]) -> None:
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for key in sorted(k for k in params if k in logged and logged[k] != params[k]):
            _log.warning("run %s keeps parameter %s=%r from its first start; this start has %r",
                         self.run_id, key, logged[key], params[key])
            self._client.set_tag(self.run_id, f"resumed_with.{key}", params[key])
        for i in range(0, len(new), _MAX_PARAMS):
            self._client.log_batch(self.run_id, params=new[i:i + _MAX_PARAMS])

    def _points_on_server(self, keys) -> set[tuple[str, int]]:
        return {(m.key, m.step) for key in keys
                for m in self._client.get_metric_history(self.run_id, key)}

    def _start_system_metrics(self, resume: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as e:  # psutil, which MLflow does not install
            _log.warning("no system metrics for run %s: %s (pip install psutil)", self.run_id, e)
            return
        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume,
                                             tracking_uri=self.uri)
        self._monitor.start()

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log `metrics` at step `epoch`, once: a (key, epoch) the run already has is skipped.
        On an outage the points are queued (one warning) and sent by a later call or finish."""
        epoch, now_ms = int(epoch), int(time.time() * 1000)
        for key, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r} at epoch {epoch} is {value!r}, not a number") \
                    from None
            if (key, epoch) not in self._seen:
                self._seen.add((key, epoch))
                self._pending.append(Metric(key, value, now_ms, epoch))
        self._flush(self._step_timeout_s)

    def set_tags(self, tags: dict) -> None:
        """Set `tags` on the run now; during an outage they are reported, not raised."""
        try:
            with _one_try(self._step_timeout_s):
                self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        except MlflowException as e:
            if not _transient(e):
                raise
            _log.error("tracking server %s failed: run %s lost tags %s (%s)", self.uri, self.run_id, tags, e.message)

    def log_artifact_dict(self, name: str, obj) -> None:
        """`obj` as the JSON artifact `name` (e.g. "config.json"), queued like metrics."""
        self.log_file(name, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def log_file(self, name: str, content: bytes) -> None:
        """`content` as the artifact `name` (e.g. "trials.csv"), queued like metrics."""
        self._pending_files[name] = content
        self._flush(self._step_timeout_s)

    def flush(self) -> bool:
        """Deliver what is queued now (one try per request); True when all of it landed."""
        return self._flush(self._step_timeout_s)

    def finish(self, status: str = "FINISHED", *, wait_s: float = 60.0) -> None:
        """Stop system metrics, deliver queued points (retrying for up to `wait_s`), end the
        run. Points still undeliverable then are reported, not raised: the checkpoint stands."""
        if self._monitor is not None:
            with _one_try(self._step_timeout_s):
                self._monitor.finish()
            self._monitor = None
        deadline = time.monotonic() + wait_s
        while not self._flush(self._step_timeout_s) and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        if self._pending or self._pending_files:
            _log.error("tracking server %s unreachable for %g s: run %s lost %d metric points "
                       "(epochs %s) and artifacts %s", self.uri, wait_s, self.run_id,
                       len(self._pending), sorted({m.step for m in self._pending}),
                       sorted(self._pending_files))
        try:
            with _one_try(self._step_timeout_s):
                self._client.set_terminated(self.run_id, status)
        except MlflowException as e:
            if not _transient(e):
                raise
            _log.error("could not mark run %s %s: %s", self.run_id, status, e.message)

    def _flush(self, budget_s: float) -> bool:
        """Send what is queued, one try per request within `budget_s`; True when all landed."""
        deadline = time.monotonic() + budget_s

        def one_try():
            left = deadline - time.monotonic()
            if left <= 0:
                raise _OutOfTime
            return _one_try(left)

        try:
            while self._pending:
                # Re-sent as first made: if a send landed but its answer was lost, the SQL
                # store drops the identical (key, step, value, timestamp) rows.
                batch = self._pending[:_MAX_METRICS]
                with one_try():
                    self._client.log_batch(self.run_id, metrics=batch)
                del self._pending[:len(batch)]
            for name, data in list(self._pending_files.items()):
                with tempfile.TemporaryDirectory() as tmp, one_try():
                    path = Path(tmp, posixpath.basename(name))
                    path.write_bytes(data)
                    self._client.log_artifact(self.run_id, str(path),
                                              posixpath.dirname(name) or None)
                del self._pending_files[name]
        except (MlflowException, _OutOfTime) as e:
            if isinstance(e, MlflowException) and not _transient(e):
                raise
            if not self._outage:
                self._outage = True
                _log.warning("tracking server %s failed (%s); training goes on, %d metric "
                             "points are queued and will be sent when it answers", self.uri,
                             getattr(e, "message", "no answer in time"), len(self._pending))
            return False
        if self._outage:
            self._outage = False
            _log.warning("tracking server %s answers again; queued points delivered", self.uri)
        return True


def end_run(uri: str, run_id: str, status: str, tags: dict | None = None) -> None:
    """Close a run that nobody else will (a Tune trial its scheduler stopped), with `tags`."""
    client = MlflowClient(uri)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))
    client.set_terminated(run_id, status)


def run_status(uri: str, run_id: str) -> str | None:
    """RUNNING, FINISHED, FAILED or KILLED; None when the store at `uri` has no such run."""
    try:
        return MlflowClient(uri).get_run(run_id).info.status
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None


def runs_tagged(uri: str, experiment: str, tags: dict[str, str]) -> list:
    """The runs of `experiment` that carry every tag in `tags` (MLflow Run objects)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    where = " and ".join(f"tags.`{k}` = {_quoted(str(v))}" for k, v in tags.items())
    return client.search_runs([found.experiment_id], filter_string=where)


def experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment `name`, created (artifacts beside an embedded store) when missing."""
    if experiment := client.get_experiment_by_name(name):
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} in {uri} is deleted: restore it with "
                                f"`mlflow experiments restore --experiment-id "
                                f"{experiment.experiment_id}` or pick another experiment name")
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri))
    except MlflowException:  # created meanwhile by another trial
        if experiment := client.get_experiment_by_name(name):
            return experiment.experiment_id
        raise


def _unfinished_run(client: MlflowClient, experiment_id: str, run_name: str) -> str | None:
    runs = client.search_runs(
        [experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"attributes.run_name = {_quoted(run_name)} "
                      "and attributes.status != 'FINISHED'")
    return runs[0].info.run_id if runs else None
