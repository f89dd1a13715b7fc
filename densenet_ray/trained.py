"""A trained model, whatever MODEL names it (the registry, a run or a checkpoint), loaded as a DenseNet
with its configuration, classes and run; shared by evaluate, predict, analyze and export.

    from densenet_ray.trained import load
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
tracking.registry; a model that needs pickle is refused unless trust_pickle=True. The formats are
theirs (checkpoint.py, tracking/registry.py); this module only puts what they give together.
"""

from __future__ import annotations

import math
import posixpath
import sys
from dataclasses import dataclass, field

import torch

from densenet_ray import checkpoint
from densenet_ray.cli import ModelError
from densenet_ray.config import TrainConfig, from_dict, to_dict
from densenet_ray.data import DataError, load_manifest
from densenet_ray.model import DenseNet, arch_kwargs, cifar_blocks, from_config
from densenet_ray.tracking import registry, results
from densenet_ray.tracking.uri import TrackingError, resolve_tracking_uri


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
    stats: tuple | None = None    # (mean, std) of the training data, recorded with the weights

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
        """Everything needed to rebuild the network elsewhere (a Ray actor): plain data and tensors,
        in the checkpoint's own layout."""
        return {"config": to_dict(self.config), "model": self.net.state_dict()}


def load(source: str, *, tracking_uri: str | None = None, trust_pickle: bool = False) -> Model:
    """The Model that `source` names (see the module docstring). `tracking_uri` is where models:/
    and runs:/ live and where a checkpoint's run is looked up (default: the flag's usual
    resolution, for a checkpoint its run's own --mlflow-tracking-uri first)."""
    source = str(source)
    try:
        if registry.is_model_uri(source):
            return _from_mlflow(source, tracking_uri, trust_pickle)
        return _from_checkpoint(source, tracking_uri, trust_pickle)
    except checkpoint.CheckpointError as e:
        raise ModelError(f"MODEL {e}") from None
    except registry.PickleRefused:
        raise
    except TrackingError as e:
        raise ModelError(str(e)) from None


def rebuild(state: dict, source: str = "model spec") -> DenseNet:
    """The eval-mode DenseNet that `state`'s config describes (a checkpoint's state, a Model.spec()),
    with its weights state["model"]; class and channel counts come from the weights themselves.
    ModelError, naming `source`, when they do not fit (checked before anything is allocated)."""
    num_classes, channels = check_weights(state.get("config"), state.get("model"), source)
    weights, cfg = state["model"], from_dict(state["config"])
    try:
        net = from_config(cfg, int(num_classes), int(channels), inference=True)
        net.load_state_dict(weights)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"{source}: its weights do not fit the architecture in its config (arch={cfg.arch!r}, "
                         f"depth={cfg.depth}, growth_rate={cfg.growth_rate}): {str(e)[:600]}") from None
    return net.eval()


def check_weights(config, weights, source: str) -> tuple[int, int]:
    """(classes, channels) when `weights` (a state dict) are exactly those of the network `config`
    (a config dict) describes, else ModelError naming `source`. Compared before any network is
    built for real: the expected shapes come from a build on the meta device (no memory), after a
    layer count from the config alone, so that a crafted config cannot make us allocate (or spend
    minutes building) a huge network whatever weights come with it."""
    if not (isinstance(weights, dict) and weights and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                          for k, v in weights.items())):
        raise ModelError(f"{source}: its weights (field model) are not a state dict of named tensors")
    for name, t in weights.items():  # a stride-0 view can claim a billion elements over 4 bytes
        if t.numel() and t.untyped_storage().nbytes() < t.numel() * t.element_size():
            raise ModelError(f"{source}: weight {name!r} claims shape {list(t.shape)} but its data holds "
                             f"{t.untyped_storage().nbytes()} bytes; refused")
    try:
        num_classes, channels = int(weights["classifier.weight"].shape[0]), int(weights["features.conv0.weight"].shape[1])
    except (KeyError, IndexError):
        raise ModelError(f"{source}: its weights are not a densenet_ray DenseNet's (no classifier.weight / "
                         "features.conv0.weight in the state dict)") from None
    if not isinstance(config, dict):
        raise ModelError(f"{source}: its config is a {type(config).__name__}; expected the training run's "
                         "configuration (a dict, as config.to_dict writes it)")
    try:
        cfg = from_dict(config)
        described = f"arch={cfg.arch!r}, depth={cfg.depth}, growth_rate={cfg.growth_rate}"
        kwargs = {**arch_kwargs(cfg.arch), **cfg.model_overrides(inference=True)}
        blocks = kwargs.get("block_config") or cifar_blocks(kwargs["depth"], kwargs["bottleneck"])
        # Every dense layer has a norm (5 entries) and a conv: more layers than entries cannot fit.
        if sum(blocks) > len(weights):
            raise ModelError(f"{source}: its config ({described}) describes {sum(blocks):,} dense layers, but its "
                             f"weights hold {len(weights)} tensors; refused before building anything")
        with torch.device("meta"):
            expected = from_config(cfg, num_classes, channels, inference=True).state_dict()
    except ModelError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise ModelError(f"{source}: its config describes no DenseNet we can build: {str(e)[:400]}") from None
    want = {k: tuple(v.shape) for k, v in expected.items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if want != got:
        count = lambda shapes: sum(math.prod(s) for s in shapes.values())  # noqa: E731
        wrong = [f"{k} {list(got[k])} (expected {list(want[k])})" for k in want if k in got and got[k] != want[k]]
        missing, extra = [k for k in want if k not in got], [k for k in got if k not in want]
        detail = "; ".join(part for part in (
            f"{len(wrong)} of other shape: {', '.join(wrong[:3])}" if wrong else "",
            f"{len(missing)} missing: {', '.join(missing[:3])}" if missing else "",
            f"{len(extra)} unexpected: {', '.join(extra[:3])}" if extra else "") if part)
        raise ModelError(f"{source}: its weights do not fit the architecture in its config ({described}): the "
                         f"config describes {count(want):,} values in {len(want)} tensors, the weights hold "
                         f"{count(got):,} in {len(got)}; {detail}")
    return num_classes, channels


def check_resume(run_dir: str, cfg: TrainConfig, classes: list[str]) -> None:
    """On the driver, before any worker starts: the checkpoint a run resumes from (the newest in
    `run_dir`, if any) loads without pickle, holds what training saves, has weights that fit its
    config, and is of this run's model and classes. A worker that failed on it would be restarted
    by Ray Train into the same file, again and again. No fallback to an older checkpoint: a state.pt
    that changed under us is for people to look at, not to step around (and Ray Train resumes from
    the one it registered last, whatever we pick)."""
    from densenet_ray.loop import check_resumable  # ray.train: only the driver of a training run needs it

    found = checkpoint.newest(run_dir)
    if found is None:
        return
    advice = (f"run {cfg.run_name!r} would resume from it; restore it, or pass another --run-name to start a "
              f"new run (its folder {posixpath.dirname(found)} is where Ray Train resumes from)")
    try:
        state, _ = checkpoint.load(found)
        checkpoint.check_training_state(state, found)
        check_weights(state["config"], state["model"], found)
        check_resumable(state, cfg, {"classes": list(classes)})
    except (ValueError, ModelError) as e:   # CheckpointError is a ValueError, so is check_resumable's
        message = str(e) if found in str(e) else f"{found}: {e}"
        raise checkpoint.CheckpointError(f"{message}\n  {advice}") from None


def class_probabilities(net: torch.nn.Module, images: torch.Tensor, mean, std) -> torch.Tensor:
    """Softmax outputs (N, classes) for uint8 images (N, H, W, C), or for (N, crops, H, W, C) the
    average of the crops' softmax outputs (fb.resnet.torch's 10-crop test ranks the crops' summed
    logits instead; see evaluate). `mean`, `std`: per channel on the 0..1 scale."""
    device = next(net.parameters()).device
    crops = images.shape[1] if images.ndim == 5 else 1
    x = images.to(device).reshape(-1, *images.shape[-3:]).permute(0, 3, 1, 2).float()
    m = torch.as_tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    s = torch.as_tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    with torch.no_grad():
        probs = net((x - m) / s).float().softmax(1)
    return probs.view(len(images), crops, -1).mean(1)


def tracking_uri(model: Model) -> str:
    """The tracking store results of `model` are logged to: the one it came from (models:/, runs:/),
    else --mlflow-tracking-uri, else its run's own, else $MLFLOW_TRACKING_URI or the embedded store."""
    return resolve_tracking_uri(model.tracking_uri or model.config.mlflow_tracking_uri)


def record(model: Model, **what) -> str:
    """Log results of `model` (tracking.results.record's metrics, tags, artifacts, artifact_dir) to
    the run that trained it, else to a new run eval-RUN_NAME in its experiment. Returns the run id."""
    return results.record(tracking_uri(model), model.run_id, experiment=model.config.experiment,
                          run_name=model.config.run_name, source=model.source, **what)


def _from_mlflow(source: str, tracking_uri: str | None, trust_pickle: bool) -> Model:
    uri = resolve_tracking_uri(tracking_uri)
    got = registry.fetch_model(source, uri, trust_pickle=trust_pickle)
    net = rebuild({"config": got.config, "model": got.module.state_dict()}, source)
    classes = [c for _, c in got.index] if got.index else [str(i) for i in range(net.classifier.out_features)]
    wnids = [w for w, _ in got.index] if got.index else classes
    stats = (tuple(got.normalization["mean"]), tuple(got.normalization["std"])) if got.normalization else None
    return Model(net, from_dict(got.config), classes, wnids, source, got.label, got.run_id, uri, got.logged, stats)


def _from_checkpoint(source: str, tracking_uri: str | None, trust_pickle: bool) -> Model:
    state, _ = checkpoint.load(source, trust_pickle=trust_pickle)
    cfg = from_dict(state["config"])
    net = rebuild(state, source)
    classes = list(state.get("classes") or [str(i) for i in range(net.classifier.out_features)])
    history = state.get("history") or [{}]
    logged = {k: history[-1][k] for k in ("val_top1_err", "val_top5_err") if k in history[-1]}
    epoch = state.get("epoch")
    name = f"checkpoint {cfg.run_name}" + (f" epoch {epoch + 1}" if isinstance(epoch, int) else "")
    # The run's store is resolved when something is logged (record), not here.
    stats = (tuple(state["mean"]), tuple(state["std"])) if state.get("mean") and state.get("std") else None
    return Model(net, cfg, classes, classes, source, name, state.get("run_id"),
                 tracking_uri or cfg.mlflow_tracking_uri, logged, stats)


# --- the data a model meets ----------------------------------------------------------------------

def normalization(model: Model, fallback=None, given=None) -> tuple[tuple, tuple, str]:
    """(mean, std, where from): those of the Manifest `given` (a --stats DATASET) when there is one;
    else the training data's, which the weights expect: recorded with the model (checkpoint, run),
    else read from the training data's manifest (the run's config `data`); else, said on stderr,
    those of `fallback` (the data being evaluated, when the training data is not reachable)."""
    if given is not None:
        if given.channels != model.channels:
            raise ModelError(f"--stats {given.root}: statistics of {given.channels}-channel images, but "
                             f"{model.name} takes {model.channels}-channel images")
        return given.mean, given.std, given.root
    if model.stats is not None and len(model.stats[0]) == model.channels:
        return (*model.stats, f"the training data {model.config.data} (recorded with the model)")

    try:
        m = load_manifest(model.config.data)
        if m.channels == model.channels:
            return m.mean, m.std, f"training data {m.root}"
    except DataError:
        pass
    if fallback is not None:
        print(f"[densenet_ray] warning: {model.name} carries no mean/std of its training data and "
              f"{model.config.data} is not readable here: normalising with those of {fallback.root}; pass "
              "--stats DATASET to choose", file=sys.stderr, flush=True)
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
