"""Ray Tune over Ray Train: search growth rate, depth and compression (and more) from a space file.

    python -m densenet_ray.tune tune_spaces/digits.yaml              # minutes on a laptop CPU
    python -m densenet_ray.tune tune_spaces/imagenet_bc.yaml --dry-run   # the trials, params, GMACs
    python -m densenet_ray.tune tune_spaces/digits.yaml --name sweep1 --resume   # after a killed driver

Every trial is a real data-parallel training run: its own TorchTrainer (the Ray Train V2 pattern:
a Tune trial function drives the trainer, and TuneReportCallback hands each epoch's metrics to
Tune's scheduler), with checkpoints, fault tolerance and its own MLflow run, nested under one
parent run for the sweep. ASHA stops the laggards. At the end: a table on the console, the same
table as a CSV artifact, validation error against parameters as a PNG (the paper's Figure 4 view),
and the best trial's model in the registry.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import time

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from densenet_ray import checkpoint, plots, preflight, spaces, train, trained
from densenet_ray import config as C
from densenet_ray import data
from densenet_ray.tracking import registry
from densenet_ray.tracking.runlog import RunLogger, end_run, run_status, runs_tagged
from densenet_ray.tracking.uri import TrackingError

SWEEP_TAG, TRIAL_TAG = "densenet_ray.sweep", "densenet_ray.trial_id"


def trial_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def run_trial(config: dict, sweep: dict) -> None:
    """One Tune trial: a whole training run of `config["params"]` on top of the sweep's base."""
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = C.from_dict(sweep["base"]).replace(**config["params"], run_name=trial_name(sweep["name"], trial_id))
    done = train.completed_history(cfg)
    if done:  # finished before the driver died, but Tune's last snapshot missed it: report, don't rerun
        path, history, run_id = done
        if run_status(sweep["uri"], run_id) == "RUNNING":  # killed before it closed
            end_run(sweep["uri"], run_id, "FINISHED")
        for metrics in history:
            ray.tune.report({**metrics, "checkpoint_path": path})
        return
    manifest = data.load_manifest(cfg.data)
    runlog = RunLogger.start(sweep["uri"], cfg.experiment, cfg.run_name, params=C.to_dict(cfg), system_metrics=False,
                             tags={"mlflow.parentRunId": sweep["parent_run_id"], TRIAL_TAG: trial_id,
                                   SWEEP_TAG: sweep["name"]})
    trainer = train.make_trainer(cfg, manifest, sweep["uri"], runlog.run_id, callbacks=[TuneReportCallback()],
                                 register=False)
    trainer.fit()


def print_trials(base: C.TrainConfig, trials: list[dict], skipped: list, num_classes: int, channels: int) -> list:
    rows = []
    print(f"{'#':>3}  {'k':>3} {'L':>4} {'theta':>5} {'B':>2} {'params':>12} {'GMACs':>8}  overrides")
    for i, params in enumerate(trials):
        d = spaces.describe(base.replace(**params), num_classes, channels)
        rows.append(d)
        print(f"{i:>3}  {d['k']:>3} {d['L']:>4} {d['theta']:>5.2f} {'y' if d['bottleneck'] else 'n':>2} "
              f"{d['params']:>12,} {d['gmacs']:>8.3f}  {params}")
    for params, reason in skipped:
        print(f"  skipped {params}: {reason}")
    return rows


def summarise(results, base: C.TrainConfig, num_classes: int, channels: int) -> list[dict]:
    rows = []
    for result in results:
        params = result.config["params"]
        frame = result.metrics_dataframe
        d = spaces.describe(base.replace(**params), num_classes, channels)
        has = frame is not None and "val_top1_err" in frame
        rows.append({
            "trial_id": (result.metrics or {}).get("trial_id", ""),
            "k": d["k"], "L": d["L"], "theta": d["theta"], "bottleneck": d["bottleneck"],
            "params": d["params"], "gmacs": round(d["gmacs"], 4),
            "best_val_top1_err": float(frame["val_top1_err"].min()) if has else math.nan,
            "final_val_top1_err": float(frame["val_top1_err"].iloc[-1]) if has else math.nan,
            "epochs_run": int(frame["epoch"].max()) + 1 if has else 0,
            "wall_s": round(float((result.metrics or {}).get("time_total_s", 0.0)), 1),
            "status": "error" if result.error else ("stopped early" if has and int(frame["epoch"].max()) + 1
                                                    < base.epochs else "finished"),
            "overrides": params,
        })
    return rows


def table(rows: list[dict]) -> str:
    out = io.StringIO()
    print(f"{'trial':<10}{'k':>4}{'L':>5}{'theta':>7}{'params':>12}{'GMACs':>8}{'best err':>10}{'epochs':>8}"
          f"{'wall s':>8}  status", file=out)
    for r in sorted(rows, key=lambda r: (math.isnan(r["best_val_top1_err"]), r["best_val_top1_err"])):
        print(f"{r['trial_id']:<10}{r['k']:>4}{r['L']:>5}{r['theta']:>7.2f}{r['params']:>12,}{r['gmacs']:>8.3f}"
              f"{r['best_val_top1_err']:>10.4f}{r['epochs_run']:>8}{r['wall_s']:>8.0f}  {r['status']}", file=out)
    return out.getvalue()


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def close_trial_runs(rows: list[dict], uri: str, experiment: str, sweep: str) -> None:
    """Close the MLflow runs their trials left open: those the scheduler stopped (killed mid-run,
    marked as such) and any trial killed after its last epoch."""
    for r in rows:
        if r["status"] == "error":  # the trainer marked it FAILED
            continue
        for run in runs_tagged(uri, experiment, {TRIAL_TAG: r["trial_id"], SWEEP_TAG: sweep}):
            if run.info.status != "RUNNING":
                continue
            if r["status"] == "stopped early":
                end_run(uri, run.info.run_id, "KILLED", {"densenet_ray.stopped_early": "true",
                                                         "densenet_ray.epochs_run": r["epochs_run"]})
            else:
                end_run(uri, run.info.run_id, "FINISHED")


def register_best(rows: list[dict], results, sweep_base: C.TrainConfig, uri: str, registered: str,
                  evaluated: registry.Evaluated):
    """Register the final weights of the trial with the lowest final validation error."""
    candidates = [(r["final_val_top1_err"], i) for i, r in enumerate(rows) if not math.isnan(r["final_val_top1_err"])]
    if not candidates:
        return None
    err, i = min(candidates)
    path = (results[i].metrics or {}).get("checkpoint_path")
    if not path:
        return None
    state, source = checkpoint.load(path)
    net = trained.rebuild(state, source)
    # Into the trial's finished run, without reopening it: its status and end time stay as the trial left them.
    version = registry.log_and_register(uri, state["run_id"], net, registered_name=registered,
                                        input_example=state["example"].numpy(), val_top1_err=err,
                                        extra={"run_name": state["config"]["run_name"],
                                               "sweep": sweep_base.run_name or ""}, dataset=evaluated)
    return rows[i]["trial_id"], version, err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenet_ray.tune", description=__doc__.split("\n")[0])
    parser.add_argument("space", metavar="SPACE.yaml", help="a search space file, e.g. tune_spaces/digits.yaml")
    parser.add_argument("--num-samples", type=int, default=None, help="sampled configurations (default: the file's)")
    parser.add_argument("--name", default=None, help="sweep name (default: SPACE-TIMESTAMP); --resume needs it")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep called --name")
    parser.add_argument("--dry-run", action="store_true", help="print the trials with params and GMACs, run nothing")
    parser.add_argument("--data", default=None, help="dataset location (default: the preset's)")
    parser.add_argument("--storage", default=None, help="checkpoint and Tune storage (default: the preset's)")
    parser.add_argument("--mlflow-tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or embedded")
    args = parser.parse_args(argv)
    if args.resume and not args.name:
        parser.error("--resume needs --name NAME of the sweep to continue")
    if args.num_samples is not None and not 1 <= args.num_samples <= spaces.MAX_TRIALS:
        parser.error(f"--num-samples {args.num_samples}: expected 1 to {spaces.MAX_TRIALS}")
    if args.name is not None and (problem := C.path_component_problem(args.name)):
        parser.error(f"--name {C.shown(args.name)}: expected {problem}")
    for flag, value in (("--data", args.data), ("--storage", args.storage)):
        if value is not None and not value.strip():
            parser.error(f"{flag} '': expected a folder or URI")
    try:
        space = spaces.load_space(args.space, data=args.data, storage=args.storage,
                                  mlflow_tracking_uri=args.mlflow_tracking_uri)
        if space.requested(args.num_samples) > spaces.MAX_TRIALS:
            raise spaces.SpaceError(f"{args.space}: --num-samples {args.num_samples} asks for "
                                    f"{space.requested(args.num_samples)} trials; a sweep runs at most {spaces.MAX_TRIALS}")
    except spaces.SpaceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stem = os.path.splitext(os.path.basename(args.space))[0]
    name = args.name or space.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    base, notes = preflight.absolute_paths(space.base.replace(run_name=name))
    for note in notes:
        print(f"[densenet_ray] {note}", flush=True)
    trials, skipped = space.trials(args.num_samples)
    if not trials:
        why = f" (e.g. {skipped[0][1]})" if skipped else ""
        print(f"error: {args.space}: no valid configuration in the space{why}", file=sys.stderr)
        return 2
    if len(trials) < space.requested(args.num_samples):
        print(f"[densenet_ray] {args.space}: num_samples {args.num_samples or space.num_samples} asks for "
              f"{space.requested(args.num_samples)} trials, but the space has only {len(trials)} distinct valid "
              f"ones: running each once", flush=True)
    print(f"[densenet_ray] sweep {name!r}: {len(trials)} trials of {space.base.preset} ({space.scheduler.type}, "
          f"{space.max_concurrent} at a time, {base.workers} worker(s) each)", flush=True)
    if args.dry_run:  # the dataset's class and channel counts when it is there, else those of its kind
        try:
            m = data.load_manifest(base.data)
            classes, channels = m.num_classes, m.channels
        except data.DataError:
            classes, channels = C.DATASETS[base.dataset] or (10, 3)
        print_trials(base, trials, skipped, classes, channels)
        return 0
    try:
        return sweep(args, space, base, name, trials, skipped)
    except (data.DataError, TrackingError, ValueError) as err:  # ClusterError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2


def sweep(args, space, base: C.TrainConfig, name: str, trials: list[dict], skipped: list) -> int:
    uri, manifest = train.preflight(base, concurrent=space.max_concurrent)
    base = base.replace(registered_model=train.registered_name(base, manifest))
    print_trials(base, trials, skipped, manifest.num_classes, manifest.channels)
    parent = RunLogger.start(uri, base.experiment, name, system_metrics=False, tags={SWEEP_TAG: name},
                             params={"space": args.space, "trials": len(trials), "scheduler": space.scheduler.type,
                                     "max_concurrent": space.max_concurrent, **{f"base.{k}": v for k, v in
                                                                                 C.to_dict(base).items()}})
    with open(args.space) as f:
        parent.log_artifact_dict("space.json", {"file": args.space, "text": f.read(), "trials": trials,
                                                "skipped": [[p, r] for p, r in skipped]})
    sweep_info = {"name": name, "base": C.to_dict(base), "uri": uri, "parent_run_id": parent.run_id}
    # The trial function only waits on its trainer, whose workers reserve the real CPUs/GPUs (Ray refuses 0).
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, sweep=sweep_info), {"cpu": 0.01})
    storage = os.path.join(base.storage, "tune")
    path = os.path.join(storage, name)
    if args.resume:
        if not ray.tune.Tuner.can_restore(path):
            raise ValueError(f"--resume: no sweep {name!r} to continue in {storage}")
        print(f"[densenet_ray] resuming sweep {name!r}: finished trials are kept", flush=True)
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       param_space={"params": ray.tune.grid_search(trials)})
    else:
        # max_t one past the last epoch: ASHA stops a trial at max_t, which would kill a trial that
        # reached its last epoch before it ends its MLflow run; this way it ends on its own.
        scheduler = (ASHAScheduler(max_t=base.epochs + 1, grace_period=space.scheduler.grace_period,
                                   reduction_factor=space.scheduler.reduction_factor)
                     if space.scheduler.type == "asha" else FIFOScheduler())
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"params": ray.tune.grid_search(trials)},
            tune_config=ray.tune.TuneConfig(metric=space.scheduler.metric, mode=space.scheduler.mode,
                                            scheduler=scheduler, max_concurrent_trials=space.max_concurrent),
            run_config=ray.tune.RunConfig(name=name, storage_path=storage, verbose=1),
        )
    results = tuner.fit()

    rows = summarise(results, base, manifest.num_classes, manifest.channels)
    print("\n" + table(rows), flush=True)
    parent.log_artifact_dict("trials.json", rows)
    parent.log_file("trials.csv", to_csv(rows).encode())
    parent.log_file("error_vs_params.png", plots.error_vs_params(rows, f"{name}: validation error against parameters"))
    close_trial_runs(rows, uri, base.experiment, name)
    best = register_best(rows, list(results), base, uri, base.registered_model,
                         registry.Evaluated(manifest.display_name(), manifest.fingerprint(), base.val_split))
    if best:
        trial_id, version, err = best
        parent.log_epoch(0, {"best_val_top1_err": err})
        print(f"[densenet_ray] best trial {trial_id}: val top-1 error {err:.4f}, registered "
              f"{base.registered_model!r} version {version}", flush=True)
    parent.finish()
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
