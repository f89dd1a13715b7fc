"""Train a DenseNet data-parallel on Ray Train, tracked in MLflow, registered in its model registry.

    python -m densenet_ray.train digits                        # the offline demo, minutes on a laptop
    python -m densenet_ray.train imagenet --data s3://bucket/imagenet --workers 16 --gpus-per-worker 1 \\
        --precision bf16 --channels-last --storage s3://bucket/runs --mlflow-tracking-uri http://mlflow:5000
    ray job submit --working-dir . -- python -m densenet_ray.train imagenet ...
    python -m densenet_ray.train cifar10 --help                # every field, with the preset's values

The driver checks everything that can be checked before a worker starts (configuration, data
manifest and shard footers, class counts, the tracking server), opens the MLflow run, then hands
the per-worker loop (loop.py) to a TorchTrainer. The same --run-name and --storage resume a run
whose driver died; --max-failures restarts failed workers from the last checkpoint.
"""

from __future__ import annotations

import math
import os
import sys

from densenet_ray import config as C
from densenet_ray import data


def prepare_data(cfg: C.TrainConfig) -> data.Manifest:
    """The dataset's manifest after the pre-flight checks; the digits demo converts itself."""
    if cfg.preset == "digits" and not _exists(cfg.data):
        from densenet_ray.data import sources, write

        print(f"[densenet_ray] converting scikit-learn's digits to {cfg.data} (first run only)", flush=True)
        write.convert(sources.digits(), cfg.data, progress=False, command="python -m densenet_ray.train digits")
    m = data.check(cfg.data, splits=(cfg.train_split, cfg.val_split))
    if cfg.num_classes is not None and cfg.num_classes != m.num_classes:
        raise data.DataError(f"--num-classes {cfg.num_classes} does not match {cfg.data}, which has "
                             f"{m.num_classes} classes ({', '.join(m.classes[:5])}{', ...' if m.num_classes > 5 else ''}); "
                             f"leave --num-classes unset to take the dataset's")
    rows = m.split(cfg.train_split).rows
    if rows < cfg.batch_size:
        raise data.DataError(f"{cfg.data}: split {cfg.train_split!r} has {rows} images, fewer than one global batch "
                             f"(--batch-size {cfg.batch_size}); lower --batch-size")
    return m


def _exists(root: str) -> bool:
    """Whether `root` holds a manifest (a broken one is reported by data.check, not overwritten)."""
    import pyarrow.fs as pafs

    from densenet_ray.data.manifest import MANIFEST, filesystem

    fs, base = filesystem(root)
    return fs.get_file_info(f"{base}/{MANIFEST}").type != pafs.FileType.NotFound


def print_config(cfg: C.TrainConfig) -> None:
    print("[densenet_ray] configuration:")
    for name, value in C.to_dict(cfg).items():
        print(f"  {name:<20} {value}")
    print(f"  {'(lr at batch)':<20} {cfg.lr_scaled:g} for {cfg.batch_size} images"
          + (f", warm-up {cfg.warmup:g} epochs" if cfg.warmup else ""), flush=True)


def connect_ray(cfg: C.TrainConfig) -> None:
    """Join the running cluster (`ray job submit`, RAY_ADDRESS, `ray start`), else start a local Ray.

    Training workers reserve CPUs, and Ray Data's read and decode tasks need CPUs of their own or
    the input pipeline waits forever: a local Ray gets enough logical CPUs for both (the OS shares
    the cores), and a cluster without a spare CPU is refused before it can hang.
    """
    import ray

    if not ray.is_initialized():
        local = {"num_cpus": max(os.cpu_count() or 1, math.ceil(cfg.workers * cfg.cpus_per_worker) + 2)}
        recorded = recorded_cluster()
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        elif recorded and not _answers(recorded):
            print(f"[densenet_ray] the Ray cluster recorded at {recorded} does not answer (stopped without "
                  f"`ray stop`?); starting a local Ray instead", flush=True)
            ray.init(address="local", **local)
        else:
            try:  # starts a local Ray, unless `ray start` left a cluster on this machine to join
                ray.init(**local)
            except ValueError as err:  # "When connecting to an existing cluster, num_cpus ... must not be provided"
                if "existing cluster" not in str(err):
                    raise
                ray.init()
    # An autoscaling cluster may start below the job's size: judge the most it can grow to.
    total = max(ray.cluster_resources().get("CPU", 0), _autoscaler_max_cpus())
    reserved = cfg.workers * cfg.cpus_per_worker
    if total - reserved < 1:
        raise ValueError(f"the Ray cluster has {total:g} CPUs and {cfg.workers} training workers reserve "
                         f"{reserved:g} (--workers x --cpus-per-worker); Ray Data needs at least one more CPU to "
                         f"read and decode images: lower --cpus-per-worker or --workers, or add CPU nodes")


def recorded_cluster_file() -> str:
    """Where `ray start --head` records its GCS address for later `ray.init()` calls on this machine."""
    return os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")


def recorded_cluster() -> str | None:
    """The GCS address `ray start --head` left on this machine for `ray.init()` to join, if any."""
    path = recorded_cluster_file()
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _answers(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _autoscaler_max_cpus() -> float:
    try:  # Ray Train sizes against the same figure; a private API, so only a hint
        from ray._private.state import state

        return (state.get_max_resources_from_cluster_config() or {}).get("CPU", 0)
    except (ImportError, AttributeError):
        return 0


def preflight(cfg: C.TrainConfig) -> tuple[str, data.Manifest]:
    """Every check that can run before a worker starts, fastest first: the tracking URI (seconds),
    Ray, the data (manifest and shard footers, class count), a tracking store other nodes can reach."""
    import ray

    from densenet_ray import tracking

    uri = tracking.resolve_tracking_uri(cfg.mlflow_tracking_uri)
    tracking.check_tracking(uri)
    connect_ray(cfg)
    manifest = prepare_data(cfg)
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if len(nodes) > 1:
        tracking.check_tracking(uri, multi_node=True)  # workers on other nodes must reach it too
    return uri, manifest


def open_run(cfg: C.TrainConfig, uri: str, manifest: data.Manifest, tags: dict | None = None):
    """The MLflow run of this training run (continued when one of that name is unfinished)."""
    from densenet_ray import tracking

    runlog = tracking.RunLogger.start(uri, cfg.experiment, cfg.run_name, params=C.to_dict(cfg), system_metrics=False,
                                      tags={"preset": cfg.preset, "workers": str(cfg.workers), **(tags or {})})
    runlog.log_artifact_dict("config.json", C.to_dict(cfg))
    runlog.log_artifact_dict("class_index.json", {str(i): [w, n] for i, (w, n) in
                                                  enumerate(zip(manifest.wnids, manifest.classes))})
    print(f"[densenet_ray] MLflow run {runlog.run_id} in experiment {cfg.experiment!r} at {uri}", flush=True)
    return runlog


def make_trainer(cfg: C.TrainConfig, manifest: data.Manifest, uri: str, run_id: str, *, callbacks=(),
                 register: bool = True):
    """The TorchTrainer for one training run; `register=False` leaves the final model out of the
    registry (Tune trials: the sweep registers its best)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from densenet_ray.loop import train_loop

    # Both datasets run again every epoch: their start and plan lines would bury the epoch lines.
    ray.data.DataContext.get_current().print_on_execution_start = False
    size = cfg.image_size
    datasets = {"train": data.read_split(cfg.data, cfg.train_split, cfg.train_transform, image_size=size,
                                         manifest=manifest),
                "val": data.read_split(cfg.data, cfg.val_split, cfg.eval_transform, image_size=size,
                                       manifest=manifest)}
    meta = {"num_classes": manifest.num_classes, "channels": manifest.channels, "mean": list(manifest.mean),
            "std": list(manifest.std), "classes": list(manifest.classes),
            "train_rows": manifest.split(cfg.train_split).rows, "run_id": run_id, "tracking_uri": uri,
            "register": register}
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": C.to_dict(cfg), "meta": meta},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.placement_strategy),
        run_config=ray.train.RunConfig(name=cfg.run_name, storage_path=cfg.storage, callbacks=list(callbacks),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=data.dataset_config(),
    )


def completed_history(cfg: C.TrainConfig) -> tuple[str, list[dict], str] | None:
    """(checkpoint path, per-epoch metrics, MLflow run id) when the run's last checkpoint holds its
    final epoch."""
    import io

    import pyarrow.fs as pafs
    import torch

    from densenet_ray.loop import STATE_FILE

    fs, base = pafs.FileSystem.from_uri(cfg.storage) if "://" in cfg.storage else (pafs.LocalFileSystem(),
                                                                                 os.path.abspath(cfg.storage))
    found = fs.get_file_info(pafs.FileSelector(f"{base}/{cfg.run_name}", allow_not_found=True))
    epochs = sorted(i.path for i in found if i.type == pafs.FileType.Directory and i.base_name.startswith("epoch_"))
    if not epochs:
        return None
    with fs.open_input_file(f"{epochs[-1]}/{STATE_FILE}") as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    if state["epoch"] + 1 < cfg.epochs:
        return None
    path = epochs[-1] if "://" not in cfg.storage else f"{cfg.storage.split('://')[0]}://{epochs[-1]}"
    return path, state["history"], state["run_id"]


def finished_run(cfg: C.TrainConfig, uri: str) -> str | None:
    """The MLflow run id when `cfg.run_name` has checkpointed its last epoch and its run is FINISHED
    (a run interrupted while it registered its model is not: resubmitted, it completes that)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    done = completed_history(cfg)
    try:
        if done and MlflowClient(uri).get_run(done[2]).info.status == "FINISHED":
            return done[2]
    except MlflowException:  # its run is in another store: finish it into this one
        pass
    return None


def run(cfg: C.TrainConfig):
    """Everything after the configuration: checks, MLflow run, TorchTrainer.fit. Returns the Ray
    Result, or None when the run had already finished (nothing trained, nothing recorded again)."""
    uri, manifest = preflight(cfg)
    if run_id := finished_run(cfg, uri):
        print(f"[densenet_ray] run {cfg.run_name!r} already finished its {cfg.epochs} epochs (MLflow run {run_id}, "
              f"checkpoints in {os.path.join(cfg.storage, cfg.run_name)}); nothing to do. To train again, pass "
              f"another --run-name.", flush=True)
        return None
    runlog = open_run(cfg, uri, manifest)
    try:
        return make_trainer(cfg, manifest, uri, runlog.run_id).fit()
    except BaseException:
        runlog.finish("FAILED", wait_s=5)
        raise


def main(argv: list[str] | None = None) -> int:
    cfg = C.from_args(sys.argv[1:] if argv is None else argv)
    print_config(cfg)
    from densenet_ray.tracking import TrackingError

    try:
        result = run(cfg)
    except (data.DataError, TrackingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result is None:
        return 0
    metrics = result.metrics or {}
    print(f"[densenet_ray] done: {cfg.run_name!r}, {metrics.get('epoch', -1) + 1} epochs, val top-1 error "
          f"{metrics.get('val_top1_err', float('nan')):.4f}; checkpoints in {os.path.join(cfg.storage, cfg.run_name)}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
