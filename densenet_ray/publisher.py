"""Rank 0's side effects in a training run, all in one place: checkpoint files, MLflow (step and
epoch metrics, curves, the registered model) and the console lines. `loop.train_loop` makes one on
rank 0 and calls it at each progress report, at the end of each epoch and once at the end:

    publisher = Publisher(cfg, meta, history, start_epoch, world, device, console, asked)
    publisher.step(report, line)           # a progress report (Progress) inside an epoch
    publisher.epoch_end(metrics, first_batch_share, state)   # checkpoint + ray.train.report + MLflow + line
    publisher.finish(net, example, selected, test)           # curves, test errors, the registry
"""

from __future__ import annotations

import tempfile
import time

import torch

import ray.train
from densenet_ray import checkpoint, plots
from densenet_ray.config import TrainConfig
from densenet_ray.console import say
from densenet_ray.model import from_config
from densenet_ray.progress import duration, stall_hint
from densenet_ray.tracking import registry
from densenet_ray.tracking.runlog import RunLogger


class Publisher:
    """Rank 0's side effects, all in one place: checkpoint files, MLflow, the console line."""

    def __init__(self, cfg: TrainConfig, meta: dict, history: list[dict], start_epoch: int, world: int,
                 device, console=None, asked: TrainConfig | None = None, start_step: int = 0) -> None:
        self.cfg, self.meta, self.start_epoch, self.console = cfg, meta, start_epoch, console
        tags = {"workers": str(world), "device": str(device), "device_name": _device_name(device)}
        if start_epoch or start_step:  # where the latest (re)start picked up, for people and for the fault tests
            tags["densenet_ray.resumed_at"] = f"epoch {start_epoch} step {start_step}"
        if start_epoch and not start_step:
            tags["densenet_ray.resumed_after_epoch"] = str(start_epoch - 1)
        # The driver logged the flags as given (precision=auto); what the workers' device made of them:
        resolved = {"precision_resolved": cfg.precision, "channels_last_resolved": cfg.channels_last}
        self.run = RunLogger.start(meta["tracking_uri"], cfg.experiment, cfg.run_name, run_id=meta["run_id"],
                                   params=resolved, tags=tags)
        self.started = time.perf_counter()
        if asked is not None and (asked.precision, asked.channels_last) != (cfg.precision, cfg.channels_last):
            self.say(f"[densenet_ray] on {_device_name(device)}: --precision {cfg.precision}"
                     + (" (auto)" if asked.precision == "auto" else "")
                     + f", channels_last {'on' if cfg.channels_last else 'off'}")
        if start_step:
            self.say(f"[densenet_ray] resumed run {cfg.run_name!r} inside epoch {start_epoch + 1} of {cfg.epochs}, after "
                     f"its step {start_step}: the epoch reads only the images it had not trained on")
        elif start_epoch:
            self.say(f"[densenet_ray] resumed run {cfg.run_name!r} from its checkpoint after epoch {start_epoch - 1}: "
                     f"continuing with epoch {start_epoch} of {cfg.epochs}")
            for metrics in history:  # an epoch whose MLflow points were lost in a crash; the rest are skipped
                self.run.log_epoch(metrics["epoch"], metrics)
        self.history = list(history)
        self.explained: set[str] = set()

    def say(self, line: str) -> None:
        say(self.console, line)

    def step(self, report: dict, line: str) -> None:
        """A progress report: the console line, and step-level metrics at MLflow step = global step
        (a step the run already has, from before a resume, is not logged again)."""
        say(self.console, line, progress=True)
        self.run.log_epoch(report["global_step"], {k: report[k] for k in
                                                   ("step_train_loss", "step_images_per_s", "step_data_wait_frac", "step_lr")})

    def inside_epoch(self, state: dict, rows, preempted: str | None) -> str:
        """A checkpoint inside the epoch (`state` with its step, `rows` the ids trained on so far),
        written into the run folder; the one it supersedes deleted. Returns where."""
        t = time.perf_counter()
        where = checkpoint.save_inside(self.cfg.run_dir, state, rows)
        pause = time.perf_counter() - t
        self.run.log_epoch(state["epoch"] * (self.meta["train_rows"] // self.cfg.batch_size) + state["step"], {"checkpoint_pause_s": pause})
        self.say(f"[densenet_ray] {f'SIGTERM to the {preempted}: ' if preempted else ''}checkpoint inside epoch {state['epoch'] + 1} after "
                 f"step {state['step']} ({len(rows)} images trained on, written in {pause:.2f} s): {where}")
        return where

    def epoch_end(self, metrics: dict, first_batch_share: float, state: dict) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(state, folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=checkpoint.folder_name(metrics["epoch"]))
        checkpoint.prune(self.cfg.run_dir)   # the epoch's checkpoints inside it are superseded
        self.run.log_epoch(metrics["epoch"], metrics)
        self.history.append(metrics)
        done = metrics["epoch"] + 1 - self.start_epoch
        eta = (time.perf_counter() - self.started) / done * (self.cfg.epochs - metrics["epoch"] - 1)
        hint = stall_hint(metrics["data_wait_frac"], first_batch_share)
        self.say(format_line(metrics, self.cfg.epochs, eta) + (f"  ({hint[0]})" if hint else ""))
        if hint and hint[0] not in self.explained:  # once per kind: the tag on later lines refers to it
            self.explained.add(hint[0])
            self.say(f"  {hint[1]}")

    def finish(self, net, example: torch.Tensor | None, selected: dict | None, test: dict | None) -> None:
        """Curves, the selected epoch and the test errors on the run, its model in the registry, the
        run closed; also when the checkpoint already held the last epoch (the job died while it
        finished the run, and was resubmitted)."""
        cfg = self.cfg
        if self.start_epoch >= cfg.epochs:
            self.say(f"[densenet_ray] run {cfg.run_name!r} had checkpointed all its {cfg.epochs} epochs "
                     "before it was interrupted: finishing it")
        if example is None or selected is None:  # no epoch at all (epochs=0)
            self.run.finish()
            return
        self.run.log_file("training_curves.png", plots.curves(self.history))
        chosen = {"densenet_ray.select": cfg.select, "densenet_ray.selected_epoch": selected["epoch"]}
        self.run.set_tags(chosen)
        if test:  # once, at the step of the epoch whose weights it measures
            self.run.log_epoch(selected["epoch"], test)
            self.say(f"[densenet_ray] test ({cfg.test_split}, {test['test_images']} images, weights of epoch "
                     f"{selected['epoch'] + 1}, --select {cfg.select}): top-1 error {test['test_top1_err']:.4f}, "
                     f"top-5 error {test['test_top5_err']:.4f}")
        if not self.meta["register"]:
            self.run.finish()
            return
        self.run.flush()
        plain = from_config(cfg, self.meta["num_classes"], self.meta["channels"], inference=True)
        plain.load_state_dict(net.state_dict())  # the registered model: no DDP, SyncBatchNorm or compile
        val_err = selected.get("val_top1_err")
        extra = {"run_name": cfg.run_name, "select": cfg.select, "selected_epoch": selected["epoch"],
                 **{k: f"{v:.6f}" for k, v in {**selected, **(test or {})}.items()
                    if k in ("val_top5_err", "test_top1_err", "test_top5_err")}}
        version = registry.log_and_register(
            self.run.uri, self.run.run_id, plain, registered_name=cfg.registered_model,
            input_example=example.float().numpy(), val_top1_err=val_err, extra=extra,
            dataset=registry.Evaluated(self.meta["dataset"], self.meta["fingerprint"], cfg.val_split))
        self.run.finish()
        self.say(f"[densenet_ray] registered {cfg.registered_model!r} version {version} ("
                 + (f"val top-1 error {val_err:.4f}" if val_err is not None else "no validation: not a champion")
                 + f", epoch {selected['epoch'] + 1}); MLflow run {self.run.run_id}")


def format_line(m: dict, epochs: int, eta_s: float) -> str:
    if "val_top1_err" in m:
        errors = (f"top1 err {m['train_top1_err']:.4f}/{m['val_top1_err']:.4f} (train/val)  "
                  f"top5 err {m['train_top5_err']:.4f}/{m['val_top5_err']:.4f}")
    else:
        errors = f"top1 err {m['train_top1_err']:.4f} (train)  top5 err {m['train_top5_err']:.4f}"
    return (f"epoch {m['epoch'] + 1:>3}/{epochs}  loss {m['train_loss']:.4f}  {errors}  lr {m['lr']:.4g}  "
            f"{m['images_per_s']:.0f} img/s  data wait {m.get('data_wait_frac', 0):.0%}  ETA {duration(eta_s)}")


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

