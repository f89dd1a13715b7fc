"""The private or semi-public Ray and MLflow APIs densenet_ray relies on, imported and probed in one
place, so that an upgrade that moves one fails here, loudly, instead of deep inside a training run."""

import inspect

from ray.train import DataConfig


def test_ray_autoscaler_limit_used_to_size_the_cluster():  # runtime.cluster_cpus
    from ray._private.state import state

    assert callable(state.get_max_resources_from_cluster_config)


def test_ray_submitted_job_runtime_env_variable():  # runtime.forwarded_env
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray._private.worker import init

    assert RAY_JOB_CONFIG_JSON_ENV_VAR in inspect.getsource(init)  # still how a submitted job's driver learns it


def test_ray_train_data_config_internals_used_for_unequal_shares():  # data.pipeline._Shares
    config = DataConfig()
    assert hasattr(config, "_enable_shard_locality")
    assert callable(config._resolve_execution_options)
    assert {"datasets", "world_size", "worker_handles", "worker_node_ids"} <= set(
        inspect.signature(DataConfig.configure).parameters)


def test_ray_data_read_task_and_block_metadata():  # data.pipeline.RowGroups
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    assert {"num_rows", "size_bytes", "exec_stats", "input_files"} <= set(inspect.signature(BlockMetadata).parameters)
    assert list(inspect.signature(ReadTask).parameters)[:2] == ["read_fn", "metadata"]
    assert "per_task_row_limit" in inspect.signature(ReadTask).parameters


def test_ray_tune_report_callback_for_train_v2():  # tune.run_trial
    from ray.tune.integration.ray_train import TuneReportCallback

    assert callable(TuneReportCallback)


def test_mlflow_global_tracking_uri_helper():  # tracking.registry._global_tracking_uri
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    assert inspect.isfunction(_use_tracking_uri) or callable(_use_tracking_uri)


def test_mlflow_system_metrics_monitor():  # tracking.runlog.RunLogger
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    assert {"run_id", "resume_logging", "tracking_uri"} <= set(inspect.signature(SystemMetricsMonitor).parameters)
    assert callable(SystemMetricsMonitor.start) and callable(SystemMetricsMonitor.finish)


def test_ray_train_report_logger_named_by_file():  # console.quiet_libraries
    import logging

    from ray.train.v2._internal.execution import context

    assert context.logger is logging.getLogger(context.__file__)


def test_ray_data_split_coordinator_stats():  # loop.pipeline_figures
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator, SplitCoordinator
    from ray.data._internal.stats import DatasetStatsSummary, OperatorStatsSummary

    assert "_coord_actor" in inspect.getsource(StreamSplitDataIterator.__init__)
    assert callable(SplitCoordinator.stats)
    assert {"operators_stats", "parents"} <= set(DatasetStatsSummary.__dataclass_fields__)
    assert {"wall_time", "output_size_bytes"} <= set(OperatorStatsSummary.__dataclass_fields__)
    assert isinstance(OperatorStatsSummary.num_rows_per_s, property)


def test_mlflow_name_validators():  # preflight.check_config: --registered-model, --experiment
    from mlflow.utils.validation import _validate_experiment_name, _validate_model_name

    assert callable(_validate_model_name) and callable(_validate_experiment_name)


def test_ray_worker_installs_its_sigterm_handler_through_utils_after_the_setup_hook():  # preempt.install
    import ray._private.utils as ray_utils
    import ray._private.workers.default_worker as default_worker
    from ray._private.worker import Worker

    assert callable(ray_utils.set_sigterm_handler)
    assert "ray._private.utils.set_sigterm_handler(" in inspect.getsource(Worker.main_loop)
    source = inspect.getsource(default_worker)
    assert source.index("load_and_execute_setup_hook(") < source.index("worker.main_loop()")
