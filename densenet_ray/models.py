"""What a MODEL argument names, loaded as a DenseNet with its configuration, classes and run; shared
by evaluate, predict, analyze and export.

    from densenet_ray.models import load
    m = load("models:/densenet-digits@champion")       # or models:/NAME/VERSION
    m = load("runs:/52a2164.../model")                 # a run's logged model ("runs:/ID" alone too)
    m = load("~/.densenet_ray/runs/digits-r1")         # a checkpoint: the run folder (newest epoch),
    m = load("s3://bucket/runs/r1/epoch_0089/state.pt")#   an epoch_NNNN folder, or its state.pt
    m.net(x)                                           # DenseNet, eval mode, on normalised float NCHW
    m.config, m.classes, m.run_id, m.logged            # TrainConfig, class names, MLflow run, val errors
    mean, std, where = normalization(m)                # the training data's, per channel, 0..1 scale

A registered model is a torch.export program without the Python module structure, so the DenseNet
is rebuilt from the run's `config.json` and loaded from the program's state dict (its parameter and
buffer names are the module's own; `load_state_dict(strict=True)` checks that every one fits).
Nothing is unpickled: checkpoints load with torch.load(weights_only=True), registered models through
registry.load_registered_model; a model that needs pickle is refused unless trust_pickle=True.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import posixpath
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import torch

from densenet_ray.config import TrainConfig, from_dict
from densenet_ray.model import DenseNet, build

CHECKPOINT_FILE = "state.pt"  # loop.STATE_FILE; not imported: loop.py imports Ray Train
ACCEPTED = ("models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID[/model], or a checkpoint: "
            "STORAGE/RUN_NAME (its newest epoch), STORAGE/RUN_NAME/epoch_NNNN or .../state.pt")


def argument_parser(module: str, doc: str, *, logs: bool) -> argparse.ArgumentParser:
    """The command line every command on a trained model starts from: MODEL, where it lives
    (--mlflow-tracking-uri; `logs`: results are logged there too) and --trust-pickle."""
    p = argparse.ArgumentParser(prog=f"python -m densenet_ray.{module}", description=doc.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL", help=ACCEPTED)
    p.add_argument("--mlflow-tracking-uri", help="where models:/ and runs:/ live" + (" and results are logged"
                   if logs else "") + " (default: $MLFLOW_TRACKING_URI, else the embedded store)")
    p.add_argument("--trust-pickle", action="store_true", help="allow a model that needs pickle to load "
                   "(it can run any code): only for models from people you trust")
    return p


class ModelError(Exception):
    """A MODEL that cannot be used; the message names it, what is wrong and what is accepted."""


@dataclass
class Model:
    """A trained DenseNet and what is known about it: its configuration, classes and MLflow run."""

    net: DenseNet                 # eval mode, on the CPU
    config: TrainConfig           # the training run's
    classes: list[str]            # display names in label order
    wnids: list[str]              # stable class ids in label order
    source: str                   # the MODEL argument as given
    name: str                     # for people: "densenet-digits v1", "checkpoint r3 epoch 3"
    run_id: str | None = None     # the MLflow run that trained it
    tracking_uri: str | None = None
    logged: dict = field(default_factory=dict)  # what training logged: val_top1_err, val_top5_err

    @property
    def channels(self) -> int:
        return self.net.in_channels

    @property
    def num_classes(self) -> int:
        return self.net.classifier.out_features

    @property
    def image_size(self) -> int:
        return self.config.image_size or self.net.input_size

    @property
    def mode(self) -> str:
        """The Pillow mode images are converted to: L (grayscale) or RGB."""
        return "L" if self.channels == 1 else "RGB"

    def spec(self) -> dict:
        """Everything needed to rebuild the network elsewhere (a Ray actor): plain data and tensors."""
        return {"arch": self.config.arch, "overrides": _overrides(self.config),
                "num_classes": self.num_classes, "channels": self.channels, "state": self.net.state_dict()}


def load(source: str, *, tracking_uri: str | None = None, trust_pickle: bool = False) -> Model:
    """The Model that `source` names (see the module docstring). `tracking_uri` is where models:/
    and runs:/ live and where a checkpoint's run is looked up (default: the flag's usual
    resolution, for a checkpoint its run's own --mlflow-tracking-uri first)."""
    source = str(source)
    if source.startswith("models:/") or source.startswith("runs:/"):
        return _from_mlflow(source, tracking_uri, trust_pickle)
    return _from_checkpoint(source, tracking_uri, trust_pickle)


def rebuild(spec: dict) -> DenseNet:
    """The eval-mode DenseNet of a Model.spec()."""
    net = build(spec["arch"], num_classes=spec["num_classes"], in_channels=spec["channels"], **spec["overrides"])
    net.load_state_dict(spec["state"])
    return net.eval()


def _overrides(cfg: TrainConfig) -> dict:
    # Inference only: the memory-efficient mode changes nothing in eval, dropout is off.
    return {k: v for k, v in cfg.model_overrides().items() if k not in ("memory_efficient", "drop_rate")}


def _network(cfg: TrainConfig, state: dict, source: str) -> DenseNet:
    """The DenseNet `cfg` describes, with the weights `state`; a clear error when they do not fit."""
    try:
        num_classes, channels = state["classifier.weight"].shape[0], state["features.conv0.weight"].shape[1]
    except (KeyError, TypeError, AttributeError, IndexError):
        raise ModelError(f"{source}: its weights are not a densenet_ray DenseNet's (no classifier.weight / "
                         "features.conv0.weight in the state dict)") from None
    try:
        net = build(cfg.arch, num_classes=int(num_classes), in_channels=int(channels), **_overrides(cfg))
        net.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"{source}: its weights do not fit the architecture in its config (arch={cfg.arch!r}, "
                         f"depth={cfg.depth}, growth_rate={cfg.growth_rate}): {str(e)[:600]}") from None
    return net.eval()


def _resolve_uri(flag: str | None, cfg: TrainConfig | None = None) -> str:
    from densenet_ray.tracking_uri import resolve_tracking_uri

    return resolve_tracking_uri(flag or (cfg.mlflow_tracking_uri if cfg else None))


def tracking_uri(model: Model) -> str:
    """The tracking store results of `model` are logged to: the one it came from (models:/, runs:/),
    else --mlflow-tracking-uri, else its run's own, else $MLFLOW_TRACKING_URI or the embedded store."""
    return _resolve_uri(model.tracking_uri, model.config)


# --- models:/ and runs:/ -----------------------------------------------------------------------

_MODELS = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")
_RUNS = re.compile(r"runs:/(?P<run>[0-9a-zA-Z]+)(?:/(?P<path>.+))?")


def _from_mlflow(source: str, tracking_uri: str | None, trust_pickle: bool) -> Model:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from densenet_ray.registry import load_registered_model

    uri = _resolve_uri(tracking_uri)
    client = MlflowClient(uri)
    logged = {}
    if m := _MODELS.fullmatch(source):
        name = m["name"]
        try:
            version = (client.get_model_version_by_alias(name, m["alias"]) if m["alias"]
                       else client.get_model_version(name, m["version"]))
        except MlflowException as e:
            raise ModelError(f"{source}: not in the registry at {uri} ({e.message}); registered there: "
                             f"{_registered(client)}") from None
        run_id, label = version.run_id, f"{name} v{version.version}"
        logged = {k: float(version.tags[k]) for k in ("val_top1_err", "val_top5_err") if k in version.tags}
        model_uri = f"models:/{name}/{version.version}"
    elif m := _RUNS.fullmatch(source):
        run_id, label = m["run"], f"run {m['run'][:8]}"
        model_uri = f"runs:/{run_id}/{m['path'] or 'model'}"
    else:
        raise ModelError(f"MODEL {source!r}: expected {ACCEPTED}")
    # First, so that a model needing pickle is refused whatever else is wrong with it.
    module = load_registered_model(model_uri, tracking_uri=uri, trust_pickle=trust_pickle)
    if not run_id:
        raise ModelError(f"{source}: the model version has no run, so no config.json to rebuild it from")
    try:
        run = client.get_run(run_id)
        with tempfile.TemporaryDirectory() as tmp:
            cfg_dict = json.loads(Path(client.download_artifacts(run_id, "config.json", tmp)).read_text())
            index = _class_index(client, run_id, tmp)
    except MlflowException as e:
        raise ModelError(f"{source}: run {run_id} in {uri} has no config.json ({e.message}); only models "
                         "trained by densenet_ray.train can be rebuilt") from None
    if not logged:
        logged = {k: run.data.metrics[k] for k in ("val_top1_err", "val_top5_err") if k in run.data.metrics}
    cfg = from_dict(cfg_dict)
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"{source}: loaded a {type(module).__name__}, not a torch module")
    net = _network(cfg, module.state_dict(), source)
    classes = [c for _, c in index] if index else [str(i) for i in range(net.classifier.out_features)]
    wnids = [w for w, _ in index] if index else classes
    return Model(net, cfg, classes, wnids, source, label, run_id, uri, logged)


def _class_index(client, run_id: str, tmp: str) -> list | None:
    """[(wnid, name)] in label order from the run's class_index.json ({"0": [wnid, name], ...})."""
    from mlflow.exceptions import MlflowException

    try:
        doc = json.loads(Path(client.download_artifacts(run_id, "class_index.json", tmp)).read_text())
    except (MlflowException, OSError):
        return None
    return [tuple(doc[str(i)]) for i in range(len(doc))]


def _registered(client) -> str:
    names = []
    for rm in client.search_registered_models(max_results=20):
        aliases = ", ".join(f"@{a}" for a in sorted(rm.aliases)) if rm.aliases else "no aliases"
        names.append(f"{rm.name} ({aliases})")
    return "; ".join(names) or "nothing"


# --- checkpoints -------------------------------------------------------------------------------

def _from_checkpoint(source: str, tracking_uri: str | None, trust_pickle: bool) -> Model:
    from densenet_ray.data.manifest import DataError, filesystem

    try:
        fs, path = filesystem(os.path.expanduser(source))
    except DataError as e:
        raise ModelError(f"MODEL {source!r}: {e}; expected {ACCEPTED}") from None
    file = _checkpoint_file(fs, path, source)
    with fs.open_input_file(file) as f:
        raw = f.read()
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise ModelError(f"{source}: {file} needs pickle to load, which can run any code its author put in it "
                         f"({str(e).splitlines()[0][:200]}); pass --trust-pickle (trust_pickle=True) only if "
                         "you trust who wrote it") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ModelError(f"{source}: {file} is not a readable checkpoint: {e}") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ModelError(f"{source}: {file} is not a densenet_ray checkpoint: expected a dict with 'model' and "
                         f"'config' (what densenet_ray.train writes), found {found}")
    cfg = from_dict(state["config"])
    net = _network(cfg, state["model"], source)
    classes = list(state.get("classes") or [str(i) for i in range(net.classifier.out_features)])
    history = state.get("history") or [{}]
    logged = {k: history[-1][k] for k in ("val_top1_err", "val_top5_err") if k in history[-1]}
    epoch = state.get("epoch")
    name = f"checkpoint {cfg.run_name}" + (f" epoch {epoch + 1}" if isinstance(epoch, int) else "")
    # The run's store is resolved when something is logged (record), not here.
    return Model(net, cfg, classes, classes, source, name, state.get("run_id"),
                 tracking_uri or cfg.mlflow_tracking_uri, logged)


def _checkpoint_file(fs, path: str, source: str) -> str:
    """state.pt itself, an epoch folder's, or the newest epoch folder's of a run folder."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return path
    if info.type != pafs.FileType.Directory:
        raise ModelError(f"MODEL {source!r}: no such file or folder; expected {ACCEPTED}")
    if fs.get_file_info(posixpath.join(path, CHECKPOINT_FILE)).type == pafs.FileType.File:
        return posixpath.join(path, CHECKPOINT_FILE)
    epochs = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path))
                    if i.type == pafs.FileType.Directory and re.fullmatch(r"epoch_\d+", i.base_name))
    for name in reversed(epochs):
        file = posixpath.join(path, name, CHECKPOINT_FILE)
        if fs.get_file_info(file).type == pafs.FileType.File:
            return file
    raise ModelError(f"MODEL {source!r}: a folder without {CHECKPOINT_FILE} or epoch_NNNN/{CHECKPOINT_FILE}; "
                     f"expected {ACCEPTED}")


# --- the data a model meets ----------------------------------------------------------------------

def normalization(model: Model, fallback=None, given=None) -> tuple[tuple, tuple, str]:
    """(mean, std, where from): those of the Manifest `given` (a --stats DATASET) when there is one;
    else the training data's, which the weights expect, read from its manifest (the run's config
    `data`); else those of `fallback` (the data being evaluated, when the training data is not
    reachable from here)."""
    from densenet_ray.data import DataError, load_manifest

    if given is not None:
        if given.channels != model.channels:
            raise ModelError(f"--stats {given.root}: statistics of {given.channels}-channel images, but "
                             f"{model.name} takes {model.channels}-channel images")
        return given.mean, given.std, given.root

    try:
        m = load_manifest(model.config.data)
        if m.channels == model.channels:
            return m.mean, m.std, f"training data {m.root}"
    except DataError:
        pass
    if fallback is not None:
        return fallback.mean, fallback.std, f"{fallback.root} (the training data {model.config.data} is not readable)"
    raise ModelError(f"{model.source}: the training data {model.config.data} (config field data) is not readable "
                     "here, and its mean/std are what the model expects; pass --stats DATASET, a dataset folder "
                     "with the same statistics (e.g. a copy of the training data)")


def check_compatible(model: Model, manifest, split: str | None = None) -> None:
    """A model evaluated on data with other channels or classes is a mistake, not a low score."""
    where = f"{manifest.root}/dataset.json"
    if manifest.channels != model.channels:
        raise ModelError(f"{where}: field channels is {manifest.channels}, but {model.name} ({model.source}) "
                         f"takes {model.channels}-channel images; evaluate it on data like its training data "
                         f"{model.config.data}")
    if manifest.num_classes != model.num_classes:
        raise ModelError(f"{where}: field classes lists {manifest.num_classes} classes, but {model.name} "
                         f"predicts {model.num_classes}; evaluate it on data with its classes")
    differ = [i for i, (a, b) in enumerate(zip(manifest.classes, model.classes)) if a != b]
    if differ:
        i = differ[0]
        raise ModelError(f"{where}: field classes[{i}] is {manifest.classes[i]!r}, but label {i} of {model.name} "
                         f"is {model.classes[i]!r} ({len(differ)} labels differ); labels would mean other classes")


def connect_ray() -> None:
    """Join the running cluster (RAY_ADDRESS, `ray start`), else start a local Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    try:
        ray.init(num_cpus=max(2, os.cpu_count() or 1))  # a reader and an inference actor at least
    except ValueError as err:  # a cluster that `ray start` left on this machine: join it
        if "existing cluster" not in str(err):
            raise
        ray.init()


def pool_size(actors: int | None) -> tuple[int, dict]:
    """(actors, Ray resources of each) for an inference actor pool over the cluster: one actor per
    GPU when there are GPUs, else one per two CPUs, leaving CPUs for the tasks that read and decode."""
    import ray

    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), total.get("CPU", 0)
    if gpus:
        return min(actors or gpus, gpus), {"num_gpus": 1}
    n = actors or max(1, int(cpus // 2))
    if cpus - n < 1:
        raise ModelError(f"--actors {n}: the Ray cluster has {cpus:g} CPUs and each inference actor reserves one; "
                         f"reading and decoding need at least one more: use --actors {max(1, int(cpus) - 1)} or fewer")
    return n, {"num_cpus": 1}


def record(model: Model, *, metrics: dict | None = None, tags: dict | None = None,
           artifacts: list[str] = (), artifact_dir: str | None = None) -> str:
    """Log `metrics` ({name: number}, at step 0), `tags` and the files `artifacts` (into the folder
    `artifact_dir` of the run) to the run that trained `model`; to a new run "eval-RUN_NAME" in its
    experiment when that run is not in the tracking store (a checkpoint from elsewhere). The one
    place these commands write to MLflow. Returns the run id."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    from densenet_ray.tracking_uri import artifact_root

    uri = tracking_uri(model)
    client = MlflowClient(uri)
    run_id = model.run_id
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run_id = None
    new = run_id is None
    if new:
        name = model.config.experiment
        experiment = client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment else
                         client.create_experiment(name, artifact_location=artifact_root(uri)))
        run_id = client.create_run(experiment_id, run_name=f"eval-{model.config.run_name or 'model'}",
                                   tags={"densenet_ray.model": model.source}).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
    for local in artifacts:
        client.log_artifact(run_id, local, artifact_dir)
    if new:
        client.set_terminated(run_id)
    return run_id
