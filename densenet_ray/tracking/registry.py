"""The model registry: a run's final model logged without pickle, registered as a new version
with the alias `candidate`, and `champion` while it has the lowest validation top-1 error among
versions evaluated on the same dataset (its manifest's fingerprint) and split. A version without
a validation error (a final run on train+val) never takes `champion` by itself.

    version = log_and_register(uri, run_id, model, registered_name="densenet121-imagenet",
                               input_example=images[:2], val_top1_err=0.253)
    model = load_registered_model("models:/densenet121-imagenet@champion")
    fetched = fetch_model("models:/densenet121-imagenet/3", uri)  # module + its run's config.json

    logits = model(images)  # float32 NCHW, normalised like the training data, any batch size

or, from any MLflow client, on numpy arrays:
    mlflow.pyfunc.load_model("models:/densenet121-imagenet@champion").predict(images)

Model format. `mlflow.pytorch.log_model(serialization_format="pt2")` runs torch.export on the model
(batch dimension dynamic, channels and image size fixed at the example's) and stores the
ExportedProgram archive `data/model.pt2`: the graph as JSON, the weights as raw tensor bytes and
the example input as a tensors-only record that loads with torch.load(weights_only=True). Nothing
in it needs pickle, so `load_registered_model` turns MLflow's pickle deserialization off
(MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false): MLflow then checks every record of the archive before
torch.export.load, and refuses a model pickled whole (`data/model.pth`, what MLflow 2 and
Databricks write) unless the caller passes trust_pickle=True. Passed over: the pickle flavour
(runs any code on load); a models-from-code pyfunc with a safetensors file (ships our source with
every version, needs densenet_ray importable wherever it loads, and `mlflow.pytorch.load_model`
would not give a torch module). The price: the exported module is traced in eval mode (BatchNorm
uses its running statistics) and torch refuses `.train()`/`.eval()` on it; fine-tune from the
training checkpoint instead.
"""

import copy
import importlib.metadata
import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from densenet_ray.tracking.uri import TrackingError, resolve_tracking_uri, temporary_env

CANDIDATE, CHAMPION = "candidate", "champion"
ERROR_TAG = "val_top1_err"  # version tag the champion is judged by (lower is better)
MODEL_URIS = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID[/model]"
_MODELS = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")
_RUNS = re.compile(r"runs:/(?P<run>[0-9a-zA-Z]+)(?:/(?P<path>.+))?")


_log = logging.getLogger(__name__)
DATASET_TAGS = ("dataset", "dataset_fingerprint", "eval_split")


@dataclass(frozen=True)
class Evaluated:
    """What a version's val_top1_err was measured on; tagged on the version as DATASET_TAGS."""

    dataset: str       # the manifest's name, e.g. "cifar10"
    fingerprint: str   # data.Manifest.fingerprint(): classes and shard checksums
    split: str | None  # the validation split; None: no validation

    def tags(self) -> dict:
        return dict(zip(DATASET_TAGS, (self.dataset, self.fingerprint, self.split or "none")))


class PickleRefused(TrackingError):
    """A model that needs pickle to load, refused without --trust-pickle."""


def log_and_register(uri: str, run_id: str, model: torch.nn.Module, *, registered_name: str,
                     input_example, val_top1_err: float | None, extra: dict | None = None,
                     dataset: Evaluated | None = None) -> int:
    """Log `model` to run `run_id` (in the store at `uri`) as pt2, register it as a new version
    of `registered_name` tagged val_top1_err, `extra` and `dataset`'s tags, move `candidate` to
    it, and `champion` too when it beats the champion's val_top1_err measured on the same dataset
    and split. Returns the version number."""
    client = MlflowClient(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    extra = extra or {}
    example = _example(input_example)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    model = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()

    # MLflow's log_model, and its SQL registry store when it checks the new version's source,
    # use the global tracking URI, whatever `client` was made with.
    with _global_tracking_uri(uri):
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
        info = mlflow.pytorch.log_model(
            model, name="model", model_id=logged.model_id, run_id=run_id,
            serialization_format="pt2", input_example=example,
            signature=infer_signature(example, output),
            # Given, not inferred: inference loads the model in a subprocess (seconds).
            pip_requirements=[f"torch=={importlib.metadata.version('torch')}"],
            # Re-runs the model through pyfunc on the example (seconds); the tests check the
            # registered model's outputs instead.
            validate_serving_input=False)
        try:
            client.create_registered_model(registered_name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {**({ERROR_TAG: repr(float(val_top1_err))} if val_top1_err is not None else {}),
                **(dataset.tags() if dataset else {}), **{k: str(v) for k, v in extra.items()}}
        version = client.create_model_version(registered_name, source=info.model_uri,
                                              run_id=run_id, tags=tags,
                                              model_id=info.model_id).version
    client.set_registered_model_alias(registered_name, CANDIDATE, version)
    if val_top1_err is not None and _beats_champion(client, registered_name, float(val_top1_err), tags):
        client.set_registered_model_alias(registered_name, CHAMPION, version)
    return int(version)


def _example(images) -> np.ndarray:
    """The input example as float32 NCHW with at least two images: torch.export makes a
    batch dimension of size 1 static, and the registered model must take any batch size."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.float32 or images.shape[0] < 1:
        raise ValueError(f"input_example: expected normalised images as a float32 array of shape "
                         f"(N, C, H, W), got {images.dtype} {images.shape}")
    return np.concatenate([images, images])[:2] if len(images) == 1 else images


def _beats_champion(client: MlflowClient, name: str, err: float, tags: dict) -> bool:
    """Whether a version with val_top1_err `err` and `tags` takes `champion`: there is none, or the
    champion was evaluated on the same dataset and split and has a higher error. A champion
    without the error tag (set by hand) counts as -inf: it stays, as nothing says it is worse."""
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    if version is None:
        return True
    champion = client.get_model_version(name, version)
    mine, theirs = ([t.get(k) for k in DATASET_TAGS] for t in (tags, champion.tags))
    if mine != theirs:
        _log.warning("%s: the champion (version %s) was evaluated on %s, this version on %s: errors on other data "
                     "are not comparable, so the champion stays; move the alias by hand if you mean it",
                     name, version, dict(zip(DATASET_TAGS, theirs)), dict(zip(DATASET_TAGS, mine)))
        return False
    return err < float(champion.tags.get(ERROR_TAG, "-inf"))


@contextmanager
def _global_tracking_uri(uri: str):
    """MLflow's own helper for this (what mlflow.artifacts uses), plus the MLFLOW_TRACKING_URI
    variable, which set_tracking_uri overwrites for subprocesses and does not put back."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with temporary_env(MLFLOW_TRACKING_URI=os.environ.get("MLFLOW_TRACKING_URI")), \
            _use_tracking_uri(uri):
        yield


def load_registered_model(model_uri: str, *, tracking_uri: str | None = None,
                          trust_pickle: bool = False) -> torch.nn.Module:
    """The torch module of `model_uri` ("models:/NAME@ALIAS", "models:/NAME/VERSION") from
    `tracking_uri` (default: resolve_tracking_uri()). A model that needs pickle to load is
    refused with a TrackingError unless `trust_pickle` (the --trust-pickle flag)."""
    tracking_uri = tracking_uri or resolve_tracking_uri(None)
    # MLflow resolves models:/ with the global registry URI, whatever it is passed.
    with (tempfile.TemporaryDirectory() as tmp, _global_tracking_uri(tracking_uri),
          temporary_env(MLFLOW_ALLOW_PICKLE_DESERIALIZATION=str(trust_pickle).lower())):
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        except MlflowException as e:
            raise TrackingError(f"cannot fetch model {model_uri} from {tracking_uri}: "
                                f"{e.message}") from None
        try:
            return mlflow.pytorch.load_model(local)
        except MlflowException as e:
            if trust_pickle or "pickle" not in e.message:
                raise
            raise PickleRefused(f"model {model_uri} needs pickle to load, which can run any code "
                                "its author put in it; pass --trust-pickle (trust_pickle=True) "
                                "only if you trust who logged it") from None


def is_model_uri(source: str) -> bool:
    return source.startswith("models:/") or source.startswith("runs:/")


@dataclass
class Fetched:
    """A registered or logged model and what its run knows about it."""

    module: torch.nn.Module
    config: dict                 # the run's config.json
    index: list | None           # [(wnid, name)] in label order, from class_index.json
    run_id: str
    label: str                   # for people: "densenet-digits v1", "run 52a2164e"
    logged: dict = field(default_factory=dict)  # val_top1_err, val_top5_err
    normalization: dict | None = None            # the training data's mean and std (normalization.json)


def fetch_model(source: str, uri: str, *, trust_pickle: bool = False) -> Fetched:
    """The model `source` names (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID[/PATH]) from
    the store at `uri`, with its run's config.json and class_index.json. TrackingError says what
    is missing and what is registered there."""
    client = MlflowClient(uri)
    logged = {}
    if m := _MODELS.fullmatch(source):
        name = m["name"]
        try:
            version = (client.get_model_version_by_alias(name, m["alias"]) if m["alias"]
                       else client.get_model_version(name, m["version"]))
        except MlflowException as e:
            raise TrackingError(f"{source}: not in the registry at {uri} ({e.message}); registered there: "
                                f"{_registered(client)}") from None
        run_id, label = version.run_id, f"{name} v{version.version}"
        logged = {k: float(version.tags[k]) for k in ("val_top1_err", "val_top5_err") if k in version.tags}
        model_uri = f"models:/{name}/{version.version}"
    elif m := _RUNS.fullmatch(source):
        run_id, label = m["run"], f"run {m['run'][:8]}"
        model_uri = f"runs:/{run_id}/{m['path'] or 'model'}"
    else:
        raise TrackingError(f"MODEL {source!r}: expected {MODEL_URIS}")
    # First, so that a model needing pickle is refused whatever else is wrong with it.
    module = load_registered_model(model_uri, tracking_uri=uri, trust_pickle=trust_pickle)
    if not run_id:
        raise TrackingError(f"{source}: the model version has no run, so no config.json to rebuild it from")
    try:
        run = client.get_run(run_id)
        with tempfile.TemporaryDirectory() as tmp:
            config = json.loads(Path(client.download_artifacts(run_id, "config.json", tmp)).read_text())
            index = _class_index(client, run_id, tmp)
            normalization = _optional_json(client, run_id, "normalization.json", tmp)
    except MlflowException as e:
        raise TrackingError(f"{source}: run {run_id} in {uri} has no config.json ({e.message}); only models "
                            "trained by densenet_ray.train can be rebuilt") from None
    if not logged:
        logged = {k: run.data.metrics[k] for k in ("val_top1_err", "val_top5_err") if k in run.data.metrics}
    if not isinstance(module, torch.nn.Module):
        raise TrackingError(f"{source}: loaded a {type(module).__name__}, not a torch module")
    return Fetched(module, config, index, run_id, label, logged, normalization)


def _class_index(client, run_id: str, tmp: str) -> list | None:
    """[(wnid, name)] in label order from the run's class_index.json ({"0": [wnid, name], ...})."""
    doc = _optional_json(client, run_id, "class_index.json", tmp)
    return None if doc is None else [tuple(doc[str(i)]) for i in range(len(doc))]


def _optional_json(client, run_id: str, name: str, tmp: str):
    try:
        return json.loads(Path(client.download_artifacts(run_id, name, tmp)).read_text())
    except (MlflowException, OSError):
        return None


def _registered(client) -> str:
    names = []
    for rm in client.search_registered_models(max_results=20):
        aliases = ", ".join(f"@{a}" for a in sorted(rm.aliases)) if rm.aliases else "no aliases"
        names.append(f"{rm.name} ({aliases})")
    return "; ".join(names) or "nothing"
