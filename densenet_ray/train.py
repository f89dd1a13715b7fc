"""Train a DenseNet data-parallel on Ray Train, tracked in MLflow, registered in its model registry.

    python -m densenet_ray.train digits                        # the offline demo, minutes on a laptop
    python -m densenet_ray.train imagenet --data s3://bucket/imagenet --workers 8 --gpus-per-worker 1 \\
        --precision bf16 --channels-last --storage s3://bucket/runs --mlflow-tracking-uri http://mlflow:5000
    ray job submit --working-dir . -- python -m densenet_ray.train imagenet ...
    python -m densenet_ray.train cifar10 --help                # every field, with the preset's values

The driver checks everything that can be checked before a worker starts (configuration, data
manifest and shard footers, class counts, the tracking server), opens the MLflow run, then hands
the per-worker loop (loop.py) to a TorchTrainer. The same --run-name and --storage resume a run
whose driver died; --max-failures restarts failed workers from the last checkpoint.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from densenet_ray import checkpoint, preempt, preflight as checks, runtime, storage, trained
from densenet_ray import config as C
from densenet_ray import data
from densenet_ray.console import Console, quiet_libraries
from densenet_ray.data import sources, write
from densenet_ray.loop import train_loop
from densenet_ray.tracking.runlog import RunLogger, run_status
from densenet_ray.tracking.uri import TrackingError, check_tracking, resolve_tracking_uri


def prepare_data(cfg: C.TrainConfig) -> data.Manifest:
    """The dataset's manifest after the pre-flight checks; a built-in dataset (digits) converts
    itself into --data on first use."""
    if cfg.dataset in sources.BUILTIN and storage.kind(f"{cfg.data}/{data.MANIFEST}") == "missing":
        if problem := checks.builtin_target_problem(cfg):  # checked first in preflight; kept beside the write
            raise data.DataError(problem)
        print(f"[densenet_ray] converting {cfg.dataset} to {cfg.data} (first run only)", flush=True)
        write.convert(sources.BUILTIN[cfg.dataset](), cfg.data, progress=False,
                      command=f"python -m densenet_ray.train {cfg.preset}")
    m = data.check(cfg.data, splits=tuple(s for s in (cfg.train_split, cfg.val_split, cfg.test_split) if s))
    stored = m.split(cfg.train_split).image_size
    if cfg.image_size is None and stored and (problem := checks.model_problem(cfg, min(stored))):
        raise ValueError(f"--arch {cfg.arch}: {problem} (--image-size none: as stored in {cfg.data})")
    if cfg.num_classes is not None and cfg.num_classes != m.num_classes:
        raise data.DataError(f"--num-classes {cfg.num_classes} does not match {cfg.data}, which has "
                             f"{m.num_classes} classes ({', '.join(m.classes[:5])}{', ...' if m.num_classes > 5 else ''}); "
                             f"leave --num-classes unset to take the dataset's")
    rows = m.split(cfg.train_split).rows
    if rows < cfg.batch_size:
        raise data.DataError(f"{cfg.data}: split {cfg.train_split!r} has {rows} images, fewer than one global batch "
                             f"(--batch-size {cfg.batch_size}); lower --batch-size")
    return m


def print_config(cfg: C.TrainConfig, width: int = 110) -> None:
    """Every field, name=value, packed into lines of at most `width` characters (one field per line
    when it is longer)."""
    print("[densenet_ray] configuration:")
    line = ""
    for name, value in C.to_dict(cfg).items():
        item = f"{name}={value}"
        if line and len(line) + 2 + len(item) > width:
            print(line)
            line = ""
        line = f"{line}  {item}" if line else f"  {item}"
    print(line)
    print(f"  lr {cfg.lr_scaled:g} at batch {cfg.batch_size}"
          + (f", warm-up {cfg.warmup:g} epochs" if cfg.warmup else ""), flush=True)


def connect(cfg: C.TrainConfig, concurrent: int = 1) -> None:
    """Ray for `concurrent` runs of `cfg` at once: a local Ray gets a logical CPU for each worker's
    reservation plus two for Ray Data's read and decode tasks (the OS shares the cores), and a
    cluster without a spare CPU is refused before the input pipeline can wait forever."""
    reserved = concurrent * cfg.workers * cfg.cpus_per_worker
    runtime.connect(cpus=reserved + 2, quiet=not cfg.verbose)
    runtime.require_spare_cpu(reserved, who=f"{concurrent * cfg.workers} training workers",
                              change="lower --cpus-per-worker or --workers")
    runtime.require_placement(workers=cfg.workers, cpus=cfg.cpus_per_worker, gpus=cfg.gpus_per_worker,
                              strategy=cfg.placement_strategy)


def small_batch_warning(cfg: C.TrainConfig) -> str | None:
    """A warning when BatchNorm would normalise over fewer than C.MIN_BN_BATCH images per worker."""
    per_worker = cfg.batch_size // cfg.workers
    if per_worker >= C.MIN_BN_BATCH or cfg.sync_bn:
        return None
    return (f"warning: --batch-size {cfg.batch_size} over --workers {cfg.workers} leaves {per_worker} images per "
            f"worker, and BatchNorm normalises each worker's batch on its own: its statistics get noisy below "
            f"{C.MIN_BN_BATCH}. Use fewer workers or a larger --batch-size (the learning rate scales with it), or "
            f"--sync-bn on GPUs")


def input_stats(cfg: C.TrainConfig, manifest: data.Manifest) -> tuple[list, list]:
    """(mean, std) per channel on the 0..1 scale that inputs are normalised with: the training data's,
    or 0 and 1 for --normalize unit (pixels / 255 only)."""
    if cfg.normalize == "unit":
        return [0.0] * manifest.channels, [1.0] * manifest.channels
    return list(manifest.mean), list(manifest.std)


def registered_name(cfg: C.TrainConfig, manifest: data.Manifest) -> str:
    """--registered-model, else densenet-DATASET: the name follows the data, so that versions of one
    name are evaluated on one dataset."""
    return cfg.registered_model or f"densenet-{manifest.display_name()}"


def preflight(cfg: C.TrainConfig, concurrent: int = 1) -> tuple[str, data.Manifest]:
    """Every check that can run before a worker starts, fastest first: the configuration itself (the
    model's shapes, names, locations), the tracking URI (seconds), Ray and what the cluster can place,
    the data (manifest and shard footers, class count), a tracking store other nodes can reach."""
    checks.check_config(cfg)
    if warning := small_batch_warning(cfg):
        print(f"[densenet_ray] {warning}", flush=True)
    uri = resolve_tracking_uri(cfg.mlflow_tracking_uri)
    check_tracking(uri)
    storage.check(cfg.data, "--data")
    storage.check(cfg.storage, "--storage")
    connect(cfg, concurrent)
    manifest = prepare_data(cfg)
    if len(runtime.cpu_nodes()) > 1:
        check_tracking(uri, multi_node=True)  # workers on other nodes must reach it too
    return uri, manifest


def open_run(cfg: C.TrainConfig, uri: str, manifest: data.Manifest, tags: dict | None = None):
    """The MLflow run of this training run (continued when one of that name is unfinished)."""
    runlog = RunLogger.start(uri, cfg.experiment, cfg.run_name, params=C.to_dict(cfg), system_metrics=False,
                                      tags={"preset": cfg.preset, "workers": str(cfg.workers), **(tags or {})})
    runlog.log_artifact_dict("config.json", C.to_dict(cfg))
    runlog.log_artifact_dict("class_index.json", {str(i): [w, n] for i, (w, n) in
                                                  enumerate(zip(manifest.wnids, manifest.classes))})
    # What the weights expect as input, so that evaluate and predict need not reach the data.
    mean, std = input_stats(cfg, manifest)
    runlog.log_artifact_dict("normalization.json", {"mean": mean, "std": std, "channels": manifest.channels,
                                                    "dataset": manifest.display_name(),
                                                    "fingerprint": manifest.fingerprint()})
    print(f"[densenet_ray] MLflow run {runlog.run_id} in experiment {cfg.experiment!r} at {uri}", flush=True)
    return runlog


def make_trainer(cfg: C.TrainConfig, manifest: data.Manifest, uri: str, run_id: str, *, callbacks=(),
                 register: bool = True, console=None):
    """The TorchTrainer for one training run; `register=False` leaves the final model out of the
    registry (Tune trials: the sweep registers its best). `console`: the driver's Console handle
    that rank 0's lines go to."""
    # The datasets run again every epoch: their start, plan and progress-bar lines would bury ours.
    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = False
    context.enable_progress_bars = cfg.verbose
    size, run_dir = cfg.image_size, cfg.run_dir
    # Rows carry their ids: a checkpoint inside an epoch records those trained on, which its resumed
    # epoch (planned when the workers (re)start) leaves out.
    datasets = {"train": data.read_split(cfg.data, cfg.train_split, cfg.train_transform, image_size=size,
                                         order=cfg.shuffle, seed=cfg.seed, manifest=manifest, decode=cfg.decode,
                                         row_ids=True, consumed=partial(checkpoint.consumed_rows, run_dir))}
    for name, split in (("val", cfg.val_split), ("test", cfg.test_split)):
        # Evaluation is decoded in the pipeline whatever --decode says: a small share of the images,
        # through a deterministic transform (imagenet_eval, none) the device path does not have.
        if split:
            datasets[name] = data.read_split(cfg.data, split, cfg.eval_transform, image_size=size, manifest=manifest)
    mean, std = input_stats(cfg, manifest)
    meta = {"num_classes": manifest.num_classes, "channels": manifest.channels, "mean": mean, "std": std,
            "classes": list(manifest.classes), "dataset": manifest.display_name(),
            "fingerprint": manifest.fingerprint(), "train_rows": manifest.split(cfg.train_split).rows,
            "train_shape": data.batch_shape(manifest, cfg.train_split, cfg.train_transform, size)[1],
            "run_id": run_id, "tracking_uri": uri, "register": register}
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": C.to_dict(cfg), "meta": meta, "console": console},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.placement_strategy),
        run_config=ray.train.RunConfig(name=cfg.run_name, storage_path=cfg.storage, callbacks=list(callbacks),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       # per-report dumps, checkpoint paths, worker-group start-up: --verbose
                                       logging_config=ray.train.LoggingConfig("INFO" if cfg.verbose else "WARNING")),
        datasets=datasets,
        # Each (re)start of the workers reads the train split in the order of the epoch it resumes.
        dataset_config=data.dataset_config(first_epoch=partial(checkpoint.next_epoch, run_dir)),
    )


def completed_history(cfg: C.TrainConfig) -> tuple[str, list[dict], str] | None:
    """(checkpoint, per-epoch metrics, MLflow run id) when the run's newest checkpoint holds its
    final epoch."""
    found = checkpoint.newest(cfg.run_dir)
    if found is None:
        return None
    state, _ = checkpoint.load(found)
    if state["epoch"] + 1 < cfg.epochs or checkpoint.inside_epoch(state):
        return None
    return found, state["history"], state["run_id"]


def finished_run(cfg: C.TrainConfig, uri: str) -> str | None:
    """The MLflow run id when `cfg.run_name` has checkpointed its last epoch and its run is FINISHED
    (a run interrupted while it registered its model is not: resubmitted, it completes that; a run
    in another store is finished into this one)."""
    done = completed_history(cfg)
    return done[2] if done and run_status(uri, done[2]) == "FINISHED" else None


def run(cfg: C.TrainConfig):
    """Everything after the configuration: checks, MLflow run, TorchTrainer.fit. Returns the Ray
    Result, or None when the run had already finished (nothing trained, nothing recorded again)."""
    uri, manifest = preflight(cfg)
    cfg = cfg.replace(registered_model=registered_name(cfg, manifest))
    # The checkpoint it resumes from, checked here: workers failing on it would be restarted into it.
    trained.check_resume(cfg.run_dir, cfg, manifest.classes)
    if run_id := finished_run(cfg, uri):
        print(f"[densenet_ray] run {cfg.run_name!r} already finished its {cfg.epochs} epochs (MLflow run {run_id}, "
              f"checkpoints in {os.path.join(cfg.storage, cfg.run_name)}); nothing to do. To train again, pass "
              f"another --run-name.", flush=True)
        return None
    runlog = open_run(cfg, uri, manifest)
    console = Console.open()
    # SIGTERM: a checkpoint at the workers' next step, rank 0's lines printed, then exit
    preempt.on_driver_sigterm(cfg.run_name, flush=console.flush)
    try:
        return make_trainer(cfg, manifest, uri, runlog.run_id, console=console.handle).fit()
    except BaseException:
        runlog.finish("FAILED", wait_s=5)
        raise
    finally:
        console.close()


def main(argv: list[str] | None = None) -> int:
    cfg, notes = checks.absolute_paths(C.from_args(sys.argv[1:] if argv is None else argv))
    quiet_libraries(cfg.verbose)
    print_config(cfg)
    for note in notes:
        print(f"[densenet_ray] {note}", flush=True)
    try:
        result = run(cfg)
    except (data.DataError, TrackingError, runtime.ClusterError, ValueError) as err:
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
